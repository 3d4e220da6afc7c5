"""SLIP: each linear layer split into a small secret part and a large residual computed on masked inputs.

- `decompose`: top-k SVD per weight matrix (linear layers; convolutions as matrices), k by rank or energy.
- `fixedpoint`: pure ring arithmetic in Z_{2^64} (fixed-point encoding, uniform one-time masks) and float masks.
- `pool`: precomputed (r, W_residual r) pairs, each used once.
- `freivalds`: the trusted side's check of the untrusted side's products (vectors fresh per session, range bound).
- `cost`: the FLOPs each side does, and the default secure rank.
- `bundle`: the owner's decomposition cache, and the executor's residual-only bundle (`slip export-bundle`).
- `executor`: the untrusted side, a service `SplitServer` serves unchanged.
- `client`: the trusted side's session with the executor (frames, chunking of long prefills).
- `trusted`: the trusted side: a causal LM whose protected linear layers call the executor on masked inputs.
- `network`: the same for any network of Linear and Conv2d layers (our CNNs; convolutions unfolded).
- `runtime`: the executor as a child process on 127.0.0.1 over TLS.
- `view`: what the untrusted side saw, and what an attacker who knows SLIP does with it.

Nothing heavy is imported here.
"""
