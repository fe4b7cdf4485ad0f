//! A channel to a server: plain or TLS (the system's CAs or `--tls-ca`, a client certificate for
//! mTLS), with the bearer token on every call.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::ClientError;
use crate::proto::image_index_client::ImageIndexClient;

/// How to reach a server; every client command takes these flags.
#[derive(Debug, Clone, Args)]
pub struct ConnectOptions {
    /// The server: http://host:port, or https://host:port for TLS. `ingest` takes several,
    /// comma-separated (replicas on one cluster store), and spreads its streams over them.
    #[arg(long, env = "IMAGELSH_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Bearer token sent with every call (see the server's --tokens-file).
    #[arg(long, env = "IMAGELSH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (https); default: the system's CAs.
    #[arg(long, env = "IMAGELSH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the address's host.
    #[arg(long, env = "IMAGELSH_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// This client's certificate (PEM), for a server that requires one (mTLS).
    #[arg(long = "tls-client-cert", env = "IMAGELSH_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// The key of --tls-client-cert (PEM).
    #[arg(long = "tls-client-key", env = "IMAGELSH_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// How long to wait for a connection, seconds.
    #[arg(long, env = "IMAGELSH_CONNECT_TIMEOUT_SECS", default_value_t = 10)]
    pub connect_timeout_secs: u64,
}

impl ConnectOptions {
    /// Options for a server at `server`, without TLS files or a token.
    pub fn to(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            token: None,
            tls_ca: None,
            tls_domain: None,
            tls_client_cert: None,
            tls_client_key: None,
            connect_timeout_secs: 10,
        }
    }
}

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The generated client over a channel that carries the token.
pub type Client = ImageIndexClient<InterceptedService<Channel, BearerToken>>;

/// Messages the clients send and take: as large as the server's default --max-message-bytes.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A client of the server `options` name. The channel connects lazily and reconnects by itself
/// after the server restarts; the first call reports an unreachable server.
pub fn connect(options: &ConnectOptions) -> Result<Client, ClientError> {
    let address = options.server.clone();
    let bad = |reason: String| ClientError::Address { address: address.clone(), reason };
    if address.contains(',') {
        return Err(bad("one server expected here (several, comma-separated, only for `ingest`)".into()));
    }
    let mut endpoint = Endpoint::from_shared(address.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(options.connect_timeout_secs.max(1)))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    if address.starts_with("https://") {
        endpoint = endpoint.tls_config(tls_config(options)?).map_err(|e| ClientError::Tls(e.to_string()))?;
    } else if options.tls_ca.is_some() || options.tls_client_cert.is_some() {
        return Err(bad("TLS files were given: use an https:// address".into()));
    }
    let token = match &options.token {
        Some(token) => {
            Some(MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| ClientError::Token)?)
        }
        None => None,
    };
    Ok(ImageIndexClient::with_interceptor(endpoint.connect_lazy(), BearerToken(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A client of each of the servers `options.server` names, comma-separated (replicas that
/// share one store: a bulk job balances its streams over them, on the client, because a
/// Service in front of them would pin each gRPC connection to one).
pub fn connect_all(options: &ConnectOptions) -> Result<Vec<Client>, ClientError> {
    let servers: Vec<&str> = options.server.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if servers.is_empty() {
        return Err(ClientError::Address { address: options.server.clone(), reason: "no server given".into() });
    }
    servers
        .into_iter()
        .map(|server| connect(&ConnectOptions { server: server.to_string(), ..options.clone() }))
        .collect()
}

fn tls_config(options: &ConnectOptions) -> Result<ClientTlsConfig, ClientError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| ClientError::Io { path: path.display().to_string(), source: e })
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &options.tls_ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls.with_native_roots(),
    };
    if let Some(domain) = &options.tls_domain {
        tls = tls.domain_name(domain.clone());
    }
    if let (Some(cert), Some(key)) = (&options.tls_client_cert, &options.tls_client_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}
