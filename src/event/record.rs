//! The spool record codec: an event as bytes on disk, and back.

use std::sync::Arc;
use std::time::SystemTime;

use crate::event::{content_hash, DataKeys, Event, EventId, JsonText};

/// Why a spooled record could not be read back as an event.
#[derive(Debug, thiserror::Error)]
#[error("spool record is damaged or from an unknown version: {0}")]
pub struct RecordError(&'static str);

/// Version byte of the record layout, so a future layout can still read old spools.
const RECORD_VERSION: u8 = 2;

/// The layout before the flags byte: read as an event with no flag set.
const RECORD_VERSION_WITHOUT_FLAGS: u8 = 1;

/// Flag bit: the event is a backfill's ([`Event::backfill`]).
const FLAG_BACKFILL: u8 = 1;

impl Event {
    /// The event as a spool record: everything needed to deliver it again after a restart.
    /// Layout (little endian): version, id (16), received_at seconds (8) and nanos (4), three
    /// optional ids (flag + 8 each), a flags byte (bit 0: backfilled), then name, token, source and data, each length-prefixed (u32).
    pub fn encode_record(&self, out: &mut Vec<u8>) {
        let since_epoch = self
            .received_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.id.0.to_le_bytes());
        out.extend_from_slice(&since_epoch.as_secs().to_le_bytes());
        out.extend_from_slice(&since_epoch.subsec_nanos().to_le_bytes());
        for key in [
            self.keys.account_id,
            self.keys.conversation_id,
            self.keys.inbox_id,
        ] {
            match key {
                Some(value) => {
                    out.push(1);
                    out.extend_from_slice(&value.to_le_bytes());
                }
                None => out.push(0),
            }
        }
        out.push(if self.backfill { FLAG_BACKFILL } else { 0 });
        for field in [&*self.name, &*self.token, &*self.source, self.data.get()] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field.as_bytes());
        }
    }

    /// Reads a record written by [`Event::encode_record`].
    pub fn decode_record(mut bytes: &[u8]) -> Result<Event, RecordError> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], RecordError> {
            if bytes.len() < n {
                return Err(RecordError("truncated"));
            }
            let (head, tail) = bytes.split_at(n);
            *bytes = tail;
            Ok(head)
        }
        fn text<'a>(bytes: &mut &'a [u8]) -> Result<&'a str, RecordError> {
            let len = u32::from_le_bytes(take(bytes, 4)?.try_into().expect("4 bytes")) as usize;
            std::str::from_utf8(take(bytes, len)?).map_err(|_| RecordError("text is not UTF-8"))
        }
        let version = take(&mut bytes, 1)?[0];
        if version != RECORD_VERSION && version != RECORD_VERSION_WITHOUT_FLAGS {
            return Err(RecordError("unknown version"));
        }
        let id = u128::from_le_bytes(take(&mut bytes, 16)?.try_into().expect("16 bytes"));
        let secs = u64::from_le_bytes(take(&mut bytes, 8)?.try_into().expect("8 bytes"));
        let nanos = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().expect("4 bytes"));
        let received_at = record_time(secs, nanos)?;
        let mut keys = [None; 3];
        for key in &mut keys {
            if take(&mut bytes, 1)?[0] == 1 {
                *key = Some(u64::from_le_bytes(
                    take(&mut bytes, 8)?.try_into().expect("8 bytes"),
                ));
            }
        }
        let flags = if version == RECORD_VERSION {
            take(&mut bytes, 1)?[0]
        } else {
            0
        };
        let name = text(&mut bytes)?;
        let token = text(&mut bytes)?;
        let source = text(&mut bytes)?;
        let data = text(&mut bytes)?;
        let (token, source) = shared_names(token, source);
        Ok(Event {
            id: EventId(id),
            content_hash: content_hash(name, data),
            name: name.into(),
            data: JsonText::from_record(data),
            token,
            source,
            received_at,
            received_mono: std::time::Instant::now(),
            keys: DataKeys {
                account_id: keys[0],
                conversation_id: keys[1],
                inbox_id: keys[2],
            },
            backfill: flags & FLAG_BACKFILL != 0,
        })
    }
}

/// Latest time a record may carry: the end of year 9999, the last RFC 3339 can write.
const MAX_RECORD_SECS: u64 = 253_402_300_799;

/// The receipt time a record stores, checked: a damaged or foreign record may hold any bytes,
/// and `SystemTime` arithmetic past its range panics.
fn record_time(secs: u64, nanos: u32) -> Result<SystemTime, RecordError> {
    if secs > MAX_RECORD_SECS || nanos >= 1_000_000_000 {
        return Err(RecordError("time out of range"));
    }
    Ok(SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
}

/// How many (token, source) pairs each thread remembers for [`shared_names`]: more than the
/// tokens whose events usually interleave in one sink's batch, few enough to search linearly.
const SHARED_NAMES: usize = 8;

thread_local! {
    /// The token and source names of records decoded lately on this thread, most recent first.
    /// A batch is a run of records from a few tokens: sharing their `Arc`s saves two allocations
    /// per event. Per thread because the decoders (sink loops) share no state they could hold
    /// it in.
    static RECENT_NAMES: std::cell::RefCell<Vec<(Arc<str>, Arc<str>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `token` and `source` as shared strings, reusing those of a recent record when equal.
fn shared_names(token: &str, source: &str) -> (Arc<str>, Arc<str>) {
    RECENT_NAMES.with_borrow_mut(|recent| {
        if let Some(i) = recent
            .iter()
            .position(|(t, s)| **t == *token && **s == *source)
        {
            let pair = recent[i].clone();
            recent[..=i].rotate_right(1);
            return pair;
        }
        if recent.len() == SHARED_NAMES {
            recent.pop();
        }
        let pair: (Arc<str>, Arc<str>) = (Arc::from(token), Arc::from(source));
        recent.insert(0, pair.clone());
        pair
    })
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn a_time_past_what_system_time_holds_is_refused_not_a_panic() {
        // Found by the spool_record fuzz target: seconds near u64::MAX overflowed SystemTime.
        let event = Event::for_test("message.created", "t", "{}");
        let mut record = Vec::new();
        event.encode_record(&mut record);
        // Version (1 byte) and id (16) come first, then seconds (8) and nanoseconds (4).
        for (secs, nanos) in [
            (u64::MAX - 1, 0u32),
            (MAX_RECORD_SECS + 1, 0),
            (0, 1_000_000_000),
        ] {
            record[17..25].copy_from_slice(&secs.to_le_bytes());
            record[25..29].copy_from_slice(&nanos.to_le_bytes());
            let error = Event::decode_record(&record).unwrap_err();
            assert_eq!(error.0, "time out of range");
        }
        record[17..25].copy_from_slice(&MAX_RECORD_SECS.to_le_bytes());
        record[25..29].copy_from_slice(&999_999_999u32.to_le_bytes());
        assert!(
            Event::decode_record(&record).is_ok(),
            "the end of year 9999 is a time"
        );
    }

    #[test]
    fn records_round_trip() {
        for (name, frame) in crate::mock::fixtures::ALL {
            let (event, data) = crate::mock::fixtures::message(frame);
            let mut original = Event::new(
                &event,
                data,
                Arc::from("agent"),
                Arc::from("wss://x/cable#agent"),
                SystemTime::UNIX_EPOCH + std::time::Duration::new(1_781_964_126, 318_123_456),
            );
            original.id = EventId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
            let mut bytes = Vec::new();
            original.encode_record(&mut bytes);
            let back = Event::decode_record(&bytes).unwrap();
            assert_eq!(back.id, original.id, "{name}");
            assert_eq!(back.name, original.name);
            assert_eq!(back.data.get(), original.data.get());
            assert_eq!(back.token, original.token);
            assert_eq!(back.source, original.source);
            assert_eq!(back.received_at, original.received_at);
            assert_eq!(back.keys, original.keys);
            assert_eq!(back.content_hash, original.content_hash);
            for cut in [0, 1, 17, bytes.len() / 2, bytes.len() - 1] {
                assert!(
                    Event::decode_record(&bytes[..cut]).is_err(),
                    "{name} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn the_backfill_flag_round_trips_and_version_1_records_still_read() {
        let mut event = Event::for_test("message.created", "t", r#"{"id":1}"#);
        event.backfill = true;
        let mut record = Vec::new();
        event.encode_record(&mut record);
        assert!(Event::decode_record(&record).unwrap().backfill);
        event.backfill = false;
        let mut plain = Vec::new();
        event.encode_record(&mut plain);
        assert!(!Event::decode_record(&plain).unwrap().backfill);
        // Version 1 had no flags byte: after the version, id, time and three absent keys.
        let flags_at = 1 + 16 + 8 + 4 + 3;
        let mut old = plain.clone();
        old.remove(flags_at);
        old[0] = RECORD_VERSION_WITHOUT_FLAGS;
        let back = Event::decode_record(&old).unwrap();
        assert!(!back.backfill);
        assert_eq!(back.data.get(), r#"{"id":1}"#);
        old[0] = 3;
        assert!(Event::decode_record(&old).is_err(), "an unknown version");
    }

    #[test]
    fn decoded_records_share_token_and_source() {
        let record = |token: &str| {
            let mut bytes = Vec::new();
            Event::for_test("message.created", token, r#"{"id":1}"#).encode_record(&mut bytes);
            Event::decode_record(&bytes).unwrap()
        };
        let (a, b, c) = (record("agent"), record("other"), record("agent"));
        assert!(Arc::ptr_eq(&a.token, &c.token) && Arc::ptr_eq(&a.source, &c.source));
        assert_eq!(&*b.token, "other");
        assert_eq!(&*b.source, "ws://127.0.0.1/cable#other");
        for i in 0..2 * SHARED_NAMES {
            assert_eq!(&*record(&format!("t{i}")).token, format!("t{i}"));
        }
        assert_eq!(&*record("agent").token, "agent");
    }
}
