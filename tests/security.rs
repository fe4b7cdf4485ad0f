//! Tokens with roles against every RPC, TLS on and off, and mutual TLS with a wrong client
//! certificate: through a real server process on loopback, certificates made here (rcgen).

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use imagelsh::proto::image_index_client::ImageIndexClient;
use imagelsh::proto::{self, Embedding, Item, item::Content};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const READ: &str = "read-token-aaaaaaaaaaaa";
const WRITE: &str = "write-token-bbbbbbbbbbbb";
const ADMIN: &str = "admin-token-cccccccccccc";

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The code each RPC answers with `token`.
async fn codes(client: &mut ImageIndexClient<Channel>, token: Option<&str>, n: u32) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |()| Code::Ok);
    let name = format!("sec{n}");
    let mut out = Vec::new();
    let create = proto::CreateIndexRequest { name: name.clone(), dim: 4, seed: 1, ..Default::default() };
    out.push(("CreateIndex", code(client.create_index(with_token(create, token)).await.map(drop))));
    let get = proto::GetIndexRequest { name: "shared".into() };
    out.push(("GetIndex", code(client.get_index(with_token(get, token)).await.map(drop))));
    out.push((
        "ListIndexes",
        code(client.list_indexes(with_token(proto::ListIndexesRequest {}, token)).await.map(drop)),
    ));
    let item = Item {
        id: format!("x{n}"),
        label: String::new(),
        metadata: Default::default(),
        content: Some(Content::Embedding(Embedding { values: vec![1.0, 0.5, 0.25, 0.125] })),
    };
    let batch = proto::IngestRequest { index: "shared".into(), batch_id: 1, items: vec![item] };
    let ingest = async {
        let mut inbound = client.ingest(with_token(tokio_stream::iter(vec![batch]), token)).await?.into_inner();
        while inbound.message().await?.is_some() {}
        Ok(())
    };
    out.push(("Ingest", code(ingest.await)));
    let query = common::query_vector("shared", &[1.0, 0.5, 0.25, 0.125], 3);
    out.push(("Query", code(client.query(with_token(query, token)).await.map(drop))));
    let delete = proto::DeleteRequest { index: "shared".into(), ids: vec!["nothing".into()] };
    out.push(("Delete", code(client.delete(with_token(delete, token)).await.map(drop))));
    let drop_request = proto::DropIndexRequest { name: name.clone() };
    out.push(("DropIndex", code(client.drop_index(with_token(drop_request, token)).await.map(drop))));
    out
}

fn write_tokens(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_reaches_its_rpcs_and_no_others_and_sighup_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(dir.path(), &format!("# test tokens\nread {READ}\nwrite {WRITE}\nadmin {ADMIN}\n"));
    let server =
        TestServer::start_with(&dir.path().join("data"), &["--no-model", "--tokens-file", tokens.to_str().unwrap()]);
    let mut client = server.client().await;
    let create = proto::CreateIndexRequest { name: "shared".into(), dim: 4, seed: 1, ..Default::default() };
    client.create_index(with_token(create, Some(ADMIN))).await.expect("admin creates");

    let allowed = |rpc: &str, role: &str| match rpc {
        "GetIndex" | "ListIndexes" | "Query" => true,
        "Ingest" | "Delete" => role != "read",
        _ => role == "admin",
    };
    for (n, (role, token)) in [("read", READ), ("write", WRITE), ("admin", ADMIN)].into_iter().enumerate() {
        for (rpc, code) in codes(&mut client, Some(token), n as u32).await {
            if allowed(rpc, role) {
                assert_eq!(code, Code::Ok, "{rpc} with the {role} token");
            } else {
                assert_eq!(code, Code::PermissionDenied, "{rpc} with the {role} token");
            }
        }
    }
    for (rpc, code) in codes(&mut client, None, 10).await {
        assert_eq!(code, Code::Unauthenticated, "{rpc} without a token");
    }
    for (rpc, code) in codes(&mut client, Some("admin-token-but-wrong-xx"), 11).await {
        assert_eq!(code, Code::Unauthenticated, "{rpc} with a wrong token");
    }
    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health is open");

    // A new file and SIGHUP: the new token works, the old one no longer does.
    let fresh = "read-token-after-reload-1";
    write_tokens(dir.path(), &format!("read {fresh}\n"));
    assert!(std::process::Command::new("kill").args(["-HUP", &server.pid().to_string()]).status().unwrap().success());
    let mut reloaded = false;
    for _ in 0..50 {
        let list = client.list_indexes(with_token(proto::ListIndexesRequest {}, Some(fresh))).await;
        if list.is_ok() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the reloaded token is accepted");
    let old = client.list_indexes(with_token(proto::ListIndexesRequest {}, Some(ADMIN))).await.unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);
}

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { ca_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A leaf certificate and key (PEM) for `names`, for a server or a client.
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages.push(usage);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

async fn tls_channel(addr: &str, ca_pem: &str, client: Option<&(String, String)>) -> Result<Channel, String> {
    let port = addr.rsplit(':').next().unwrap();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?;
    endpoint.connect().await.map_err(|e| e.to_string())
}

/// A call over `channel`: Ok, or the status code (a refused handshake surfaces here too).
async fn list(channel: Channel) -> Result<(), Code> {
    ImageIndexClient::new(channel).list_indexes(proto::ListIndexesRequest {}).await.map(drop).map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_only_tls_and_mutual_tls_refuses_a_foreign_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("imagelsh test CA");
    let (cert, key) = pki.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let cert_path = dir.path().join("server.pem");
    let key_path = dir.path().join("server.key");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    let tls_args = ["--no-model", "--tls-cert", cert_path.to_str().unwrap(), "--tls-key", key_path.to_str().unwrap()];

    // TLS: a client trusting the CA gets through; a plaintext client does not.
    let server = TestServer::start_with(&dir.path().join("a"), &tls_args);
    let channel = tls_channel(&server.addr, &pki.ca_pem, None).await.expect("TLS connects");
    list(channel).await.expect("a call over TLS");
    let plain = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await;
    if let Ok(plain) = plain {
        assert!(list(plain).await.is_err(), "plaintext against a TLS server must fail");
    }
    // A client that trusts another CA refuses the server.
    let other = Pki::new("another CA");
    let untrusted = tls_channel(&server.addr, &other.ca_pem, None).await;
    if let Ok(channel) = untrusted {
        assert!(list(channel).await.is_err(), "a server certificate from an unknown CA must be refused");
    }
    drop(server);

    // mTLS: a client certificate from the CA gets through; one from another CA, or none, not.
    let mut mtls_args = tls_args.to_vec();
    mtls_args.extend(["--tls-client-ca", ca_path.to_str().unwrap()]);
    let server = TestServer::start_with(&dir.path().join("b"), &mtls_args);
    let good = pki.leaf(&["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let channel = tls_channel(&server.addr, &pki.ca_pem, Some(&good)).await.expect("mTLS connects");
    list(channel).await.expect("a call with a client certificate from the CA");
    let foreign = other.leaf(&["client"], ExtendedKeyUsagePurpose::ClientAuth);
    for client in [Some(&foreign), None] {
        match tls_channel(&server.addr, &pki.ca_pem, client).await {
            Err(_) => {}
            Ok(channel) => assert!(list(channel).await.is_err(), "a client {:?} must be refused", client.is_some()),
        }
    }
    // Plain TLS server without tokens on loopback still answers health: the server is up.
    let channel = tls_channel(&server.addr, &pki.ca_pem, Some(&good)).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("still serving");
}
