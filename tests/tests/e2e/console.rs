//! `GET /` (SPEC §7.7): the console page and its script, embedded in the
//! binary as committed in `gateway/assets/` (the browser tests in
//! `clients/console/test/` drive it).

use switchboard_tests::*;

/// `GET path`: status, content type and body.
async fn get(gw: &GatewayServer, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", gw.addr);
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw)).await.unwrap().unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_owned))
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

fn asset(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/assets").join(name))
        .unwrap()
}

#[tokio::test]
async fn the_console_page_and_its_script_are_served_from_the_binary() {
    let stack = Stack::start().await;
    let (status, content_type, html) = get(&stack.gateway, "/").await;
    assert_eq!((status, content_type.as_str()), (200, "text/html; charset=utf-8"));
    assert!(html.contains(r#"<script src="/console.js"></script>"#), "{html}");
    assert_eq!(html, asset("console.html"));
    let (status, content_type, js) = get(&stack.gateway, "/console.js").await;
    assert_eq!((status, content_type.as_str()), (200, "text/javascript; charset=utf-8"));
    assert_eq!(js, asset("console.js"));
    assert!(js.contains("var Client = class"), "the TypeScript client is bundled in");
}
