"""The hardening harnesses: hostile input against every server (`bench fuzz`, `fuzz_core` + `fuzz_service` +
`fuzz_targets/`) and many light clients with a kill and restart (`bench load`, `load_service`); what they share
(memory sampling, raw frames, log watching) is in `common`."""
