"""Fuzz targets for every parser of outside input, shared by the property tests and scripts/fuzz.py.

`targets.TARGETS` maps a name to a function of bytes; each one turns its bytes into an input
(arbitrary bytes, or a valid document with a few fields mutated), feeds the parser and checks
the answer. It returns quietly when the parser gave a valid object or its own error naming a
field; anything else (another exception, an error that names nothing, a secret of the input
in a message, a valid record that does not round-trip) raises, and is a bug.

Modules: seeds (valid documents, the byte reader, the mutator), oracles (the checks), targets
(records, services, rotation, snapshot, Consul's answers, the UAPI reply; the registry), files
(agent.toml, topology, answers), cni (the CNI plugin with the kernel stubbed). Certificates
(issue 12, item 1) get their target here once they exist: see the note at targets.TARGETS.
"""
