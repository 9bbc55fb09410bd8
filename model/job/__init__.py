"""The job spine: config files, start-up (logging, multi-host), and the one model-spec resolver."""
