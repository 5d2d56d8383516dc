"""pdserve.deploy: the `pdserve` command line and, later, cluster launch."""
