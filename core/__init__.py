"""The ground of covidct: settings, the results store and the audit log.  Imports no stage."""
