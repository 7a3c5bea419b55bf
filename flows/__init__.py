import logging

# Our task modules log through the standard library; Prefect forwards them to the UI when they are listed
# in PREFECT_LOGGING_EXTRA_LOGGERS (the CLI and the deployments set it) and their level lets INFO through.
for _name in ("tasks", "flows"):
    logging.getLogger(_name).setLevel(logging.INFO)
