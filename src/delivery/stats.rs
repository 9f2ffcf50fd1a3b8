//! The pipeline's counters, shared by the ingest, the push-out and the sink loops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;

/// Counters of the pipeline, readable from outside.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Events appended to the spool.
    pub spooled: AtomicU64,
    /// Events read that the ingest gave up on when the shutdown deadline passed while the spool
    /// refused them (or its disk did not answer): never appended, so lost.
    pub not_spooled: AtomicU64,
    /// Events that matched no route, by event name (they went to the `unmatched` sink, if any).
    pub unmatched: Mutex<BTreeMap<String, u64>>,
    /// Events refused by a full spool (`when_full: drop_newest`).
    pub spool_dropped_newest: AtomicU64,
    /// Undelivered events deleted from a full spool to make room (`when_full: drop_oldest`).
    pub spool_dropped_oldest: AtomicU64,
    /// Copies of undelivered events pushed out of a full spool into the dead letters of the
    /// sinks that had not delivered them (`when_full: dead_letter`), summed over sinks; not
    /// included in `dead_lettered`.
    pub spool_pushed_out: AtomicU64,
    /// Deliveries confirmed, summed over sinks.
    pub delivered: AtomicU64,
    /// Events a sink gave up and put in its dead letters (pushed-out ones are counted apart).
    pub dead_lettered: AtomicU64,
    /// Spool records that could not be decoded (never expected).
    pub undecodable: AtomicU64,
    /// Whether the ingest's last append to the spool failed (set per batch): the spool is not
    /// writable and the sockets are held back until it is, so the process is not ready.
    pub append_failing: AtomicBool,
}
