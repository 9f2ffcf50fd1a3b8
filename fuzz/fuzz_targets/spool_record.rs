//! Fuzz target: see `chatwoot_bridge::fuzzing::spool_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatwoot_bridge::fuzzing::spool_record(data));
