"""vattn's cluster layer: command line now; Ray Serve deployments, router and ingress next."""
