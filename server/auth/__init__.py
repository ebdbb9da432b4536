"""Who may call what: credentials, the namespaces and tokens an admin created,
and their replication between daemons.

- ``tokens``: the data-token format and its hash (scrypt; daemons never keep a secret);
- ``table``: the replicated table of namespaces and token hashes (newest entry wins a merge);
- ``guard``: the check every RPC passes in ``Method.run`` (both transports): who the
  caller is (UNAUTHENTICATED otherwise) and whether it may do this to that
  namespace (PERMISSION_DENIED otherwise);
- ``sync``: the table's replication to every member of the cluster.
"""
