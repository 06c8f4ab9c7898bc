"""The `mlds` command line: one entry point, subcommands loaded lazily so `mlds train` never imports kopf."""
