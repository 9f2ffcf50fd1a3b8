//! Fuzz target: see `chatwoot_bridge::fuzzing::keys_and_paths`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatwoot_bridge::fuzzing::keys_and_paths(data));
