//! Frames recorded from Chatwoot (copies of `shared/chatwoot/fixtures`), embedded so the mock
//! server broadcasts real-shaped events and tests can check every one.

/// `(event name, whole frame as Chatwoot sent it)` for each recorded event.
pub const ALL: &[(&str, &str)] = &[
    (
        "assignee.changed",
        include_str!("../../fixtures/assignee.changed.json"),
    ),
    (
        "contact.updated",
        include_str!("../../fixtures/contact.updated.json"),
    ),
    (
        "conversation.created",
        include_str!("../../fixtures/conversation.created.json"),
    ),
    (
        "conversation.status_changed",
        include_str!("../../fixtures/conversation.status_changed.json"),
    ),
    (
        "conversation.typing_on",
        include_str!("../../fixtures/conversation.typing_on.json"),
    ),
    (
        "conversation.updated",
        include_str!("../../fixtures/conversation.updated.json"),
    ),
    (
        "message.created",
        include_str!("../../fixtures/message.created.json"),
    ),
    (
        "message.updated",
        include_str!("../../fixtures/message.updated.json"),
    ),
    (
        "notification.created",
        include_str!("../../fixtures/notification.created.json"),
    ),
    (
        "presence.update",
        include_str!("../../fixtures/presence.update.json"),
    ),
];

/// The recorded event `name` as the token `sample` would have received it, for showing what a
/// config does with it (`check`); `None` for a name with no recording.
pub fn sample_event(name: &str) -> Option<crate::event::Event> {
    let (_, frame) = ALL.iter().find(|(recorded, _)| *recorded == name)?;
    match crate::source::protocol::decode(frame).ok()? {
        crate::source::protocol::ServerFrame::Message { event, data, .. } => {
            Some(crate::event::Event::new(
                &event,
                crate::event::JsonText::from_raw(data.0),
                std::sync::Arc::from("sample"),
                std::sync::Arc::from("wss://chatwoot.example/cable#sample"),
                std::time::SystemTime::now(),
            ))
        }
        _ => None,
    }
}

/// The event name and `data` of a fixture frame, for tests that check something of every
/// recorded event. Panics for a frame that is not a message (every fixture is one).
#[cfg(test)]
pub(crate) fn message(frame: &str) -> (String, crate::event::JsonText) {
    match crate::source::protocol::decode(frame).expect("fixtures decode") {
        crate::source::protocol::ServerFrame::Message { event, data, .. } => {
            (event.into_owned(), crate::event::JsonText::from_raw(data.0))
        }
        other => panic!("a fixture is not a message: {other:?}"),
    }
}
