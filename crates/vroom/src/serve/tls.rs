//! vroomd's side of mutual TLS on the cluster's API port: it serves its own
//! certificate and requires of every caller a client certificate signed by
//! the cluster's CA. The TLS directory and the client's side are
//! [`vroom_client::tls`]'s; the CA that issues the certificates is
//! [`vroom_cluster::tls`]'s.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;

/// The server config of the TLS directory `dir`.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, String> {
    vroom_client::tls::server_config(dir).map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vroom_cluster::tls::Ca;

    /// A certificate the CA issues verifies against the CA on both ends of
    /// a TLS handshake; one from another CA is refused.
    #[tokio::test]
    async fn issued_certificates_pass_mutual_tls_and_strangers_do_not() {
        let ca = Ca::generate("c1").unwrap();
        let other = Ca::generate("c2").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (server, client, stranger) = (
            dir.path().join("s"),
            dir.path().join("c"),
            dir.path().join("x"),
        );
        ca.issue("n1", &["127.0.0.1".into(), "n1".into()], &server)
            .unwrap();
        ca.issue("me", &[], &client).unwrap();
        other.issue("me", &[], &stranger).unwrap();
        let handshake = |client_dir: std::path::PathBuf| {
            let server = server.clone();
            async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&server).unwrap());
                let accepted = tokio::spawn(async move {
                    let (tcp, _) = listener.accept().await.unwrap();
                    acceptor.accept(tcp).await.map(|_| ())
                });
                let client = vroom_client::tls::client_config(&client_dir).unwrap();
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let connected = tokio_rustls::TlsConnector::from(client)
                    .connect(name, tcp)
                    .await;
                let accepted = accepted.await.unwrap();
                connected.is_ok() && accepted.is_ok()
            }
        };
        assert!(
            handshake(client).await,
            "a certificate of the cluster is let in"
        );
        assert!(
            !handshake(stranger).await,
            "a stranger's certificate is refused"
        );
    }
}
