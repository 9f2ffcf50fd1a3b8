//! Role `mock`: the mock cable server, in blast mode when `--blast-count` is given.

use std::time::{Duration, Instant};

use anyhow::Result;
use chatwoot_bridge::mock::{Answer, Blast, MockConfig, MockServer};
use tokio::io::AsyncReadExt;

use crate::args::Args;

/// Starts the server, prints `LISTEN <url>`, and with `--stats` a `STAT` line every 250 ms.
/// Lives until stdin closes (the orchestrator drops it) or it is killed.
pub(crate) async fn run(args: Args) -> Result<()> {
    let count: u64 = args.num("blast-count", 0);
    let rate: f64 = args.num("rate", 0.0);
    let listen = args.str("listen", "127.0.0.1:0").parse()?;
    let server = MockServer::start(MockConfig {
        listen,
        unknown_answer: Answer::Confirm,
        ping_interval: Duration::from_millis(args.num("ping-ms", 3000)),
        blast: (count > 0).then_some(Blast {
            count,
            rate: (rate > 0.0).then_some(rate),
            conversations: args.num("conversations", 64),
        }),
        ..MockConfig::default()
    })
    .await?;
    println!("LISTEN {}", server.url());
    let stats = args.has("stats");
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            n = stdin.read(&mut buf) => if n.unwrap_or(0) == 0 { break },
            _ = tick.tick(), if stats => {
                println!("STAT t={:.3} streaming={} open={} accepted={}",
                    started.elapsed().as_secs_f64(), server.streaming_subscriptions(),
                    server.open_connections(), server.connections_accepted());
            }
        }
    }
    server.stop().await;
    Ok(())
}
