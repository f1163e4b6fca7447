//! The command-line tools `publish`, `tail` and `token`: clients of a
//! running bus, and the minting of client tokens.

use std::{process::ExitCode, time::Duration};

use switchboard_proto::{auth::BearerKey, client::BusClient, eventbus::v1 as pb};

use crate::{ClientArgs, EXIT_CONFIG};

/// Prints a client token for `claims`, signed with the HS256 `secret`.
pub(crate) fn token(secret: &str, claims: &serde_json::Value) -> ExitCode {
    match switchboard_gateway::auth::mint_hs256(secret.as_bytes(), claims) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The claims of a client token, for `token` and for the token printed in dev mode.
pub(crate) fn token_claims(
    sub: &str,
    ttl: Duration,
    roles: &[String],
    channels: &[String],
    audience: Option<&str>,
    issuer: Option<&str>,
) -> serde_json::Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut claims = serde_json::json!({ "sub": sub, "iat": now, "exp": now + ttl.as_secs() });
    if !roles.is_empty() {
        claims["roles"] = serde_json::json!(roles);
    }
    if !channels.is_empty() {
        claims["channels"] = serde_json::json!(channels);
    }
    if let Some(aud) = audience {
        claims["aud"] = serde_json::json!(aud);
    }
    if let Some(iss) = issuer {
        claims["iss"] = serde_json::json!(iss);
    }
    claims
}

/// A client of the bus at `url`, for the tools and the benchmarks.
///
/// # Errors
/// When the URL or the key is malformed.
pub(crate) fn bus_client(
    url: &str,
    key: Option<&str>,
    tls: Option<&switchboard_tls::ClientTls>,
) -> Result<BusClient, String> {
    let key = BearerKey::new(key).map_err(|e| format!("--key: {e}"))?;
    switchboard_proto::client::bus(url, key, tls).map_err(|e| format!("--url: {e}"))
}

pub(crate) async fn publish(
    args: ClientArgs,
    channel: String,
    event: String,
    json: String,
    key: Option<String>,
) -> ExitCode {
    let mut client = match bus_client(&args.url, args.key.as_deref(), args.tls.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let request = pb::PublishRequest {
        channel,
        event,
        data: json.into_bytes().into(),
        idempotency_key: key.unwrap_or_default(),
        meta: Default::default(),
    };
    match client.publish(request).await {
        Ok(resp) => {
            let r = resp.into_inner();
            println!(
                "{}",
                serde_json::json!({ "event_id": r.event_id, "offset": r.offset, "epoch": r.epoch, "duplicate": r.duplicate })
            );
            ExitCode::SUCCESS
        }
        Err(status) => {
            eprintln!("error: {}: {}", status.code(), status.message());
            ExitCode::FAILURE
        }
    }
}

pub(crate) async fn tail(args: ClientArgs, channel: String, since: Option<String>) -> ExitCode {
    let since = match since.as_deref().map(switchboard_gateway::protocol::parse_since) {
        None => None,
        Some(Some(s)) => Some(pb::StreamPosition { offset: s.offset, epoch: s.epoch }),
        Some(None) => {
            eprintln!("error: --since must be OFFSET:EPOCH");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut client = match bus_client(&args.url, args.key.as_deref(), args.tls.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let join =
        pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Join(pb::Join { channel, since })) };
    // The request stream stays open (and the subscription with it) until exit.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx.send(join).await;
    let mut stream = match client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            eprintln!("error: {}: {}", status.code(), status.message());
            return ExitCode::FAILURE;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            m = stream.message() => m,
        };
        use pb::subscribe_response::Response as R;
        match msg {
            Ok(Some(pb::SubscribeResponse { response: Some(R::Joined(j)) })) => {
                if let Some(err) = j.error {
                    eprintln!("error: {}", err.message);
                    return ExitCode::FAILURE;
                }
                let p = j.position.unwrap_or_default();
                eprintln!(
                    "# joined {} at {}:{} (recovered: {}, missed: {})",
                    j.channel, p.offset, p.epoch, j.recovered, j.missed
                );
            }
            Ok(Some(pb::SubscribeResponse { response: Some(R::Events(batch)) })) => {
                for e in &batch.events {
                    println!("{}", switchboard_gateway::protocol::event_frame(&switchboard_gateway::bus::event_ref(e)));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return ExitCode::SUCCESS,
            Err(status) => {
                eprintln!("error: {}: {}", status.code(), status.message());
                tokio::time::sleep(Duration::from_millis(10)).await;
                return ExitCode::FAILURE;
            }
        }
    }
}
