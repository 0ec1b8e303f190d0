"""Security material: key vaults (``vault``: file and PKCS#11 KEK backends),
bus identities and their ACL table (``bus_acl``), and the files that make a
broker enforce them (``bus_files``: passwords, ACL files, TLS material)."""
