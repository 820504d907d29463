from rsdjax.cli import entry

entry()
