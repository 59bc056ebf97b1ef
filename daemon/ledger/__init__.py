"""The one owner of persisted state: the ledger of leases and engines, its database, the record
that checks it at start, recovery from a damaged one, and the store of measured fingerprints."""
