"""The mlds server side: the lease book, the lease API, the object store, `mlds run` and the kopf operator."""
