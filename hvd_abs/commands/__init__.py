"""One module per `hvd-abs` subcommand. Modules import only click at load time, so `--help` is
fast; each command imports torch, Horovod or Ray inside its body."""
