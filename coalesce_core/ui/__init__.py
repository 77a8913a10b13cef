"""The user interface: the command line, reports and terminal views, the demo."""
