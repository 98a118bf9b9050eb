"""One host's processes: runtimes and their sidecars, registered servers, and the real components they run on."""
