"""TEE layer partitioning: the first layers in a trusted executor behind a sealed channel (simulated attestation,
X25519, AES-GCM), the rest on an untrusted accelerator, the cut chosen by measured attacks.

Modules: `channel` (measurement, simulated quote, handshake, sealing), `cost` (the cost model and its
measurements), `select` (the selection rule), `executor` (the trusted executor's service and the client),
`process` (the two processes of `splitveil partition run`), `enclave_lm` (`splitveil serve --enclave`: the Λ-split
trunk behind the sealed channel). Importing this package imports nothing heavy.
"""
