# The two commands of the README. Both build the environment first when it is missing or stale
# (scripts/setup_env.sh is idempotent: a no-op when .venv's stamp matches its inputs).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: env test demo clean

env:
	@bash scripts/setup_env.sh

test: env  # (the 25 slowest tests are listed at the end: where the suite's time goes)
	$(PY) -m pytest tests -n 2 --durations=25

demo: env
	@bash scripts/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info hvd_abs/_C*.so
