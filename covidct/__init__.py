"""The top of covidct: the command line and `serve`.  Imports the stages; imported by none."""
