"""One module per ``dsmeter`` subcommand (or group); each is a thin shell over library code."""
