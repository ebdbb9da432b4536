"""gRPC services of the daemon: Data (data.py), Cluster (cluster.py), Admin (admin.py),
all registered through one strict handler seam (handlers.py)."""
