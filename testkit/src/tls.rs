//! Test certificates: a certificate authority and the server and client certificates it
//! signed, made with the `openssl` command, for servers that speak TLS in tests (etcd,
//! PostgreSQL).

use std::path::{Path, PathBuf};
use std::process::Command;

/// PEM files of a test certificate authority, and the server and client certificates it
/// signed (for 127.0.0.1 and localhost).
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// A client certificate the server accepts.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// Creates a CA and a server and a client certificate signed by it, with the `openssl` command.
pub fn make_certificates(dir: &Path) -> TlsMaterial {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl (install Debian's openssl): {e}"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=tendril-test-ca"];
    ca.extend(key);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(&ca);
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let mut req = vec!["req", "-subj"];
        let subject = format!("/CN=tendril-test-{name}");
        req.push(&subject);
        req.extend(key);
        let (key_file, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        req.extend(["-keyout", &key_file, "-out", &csr]);
        openssl(&req);
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"),
        )
        .expect("write the certificate extensions");
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-extfile",
            &ext,
        ]);
    }
    TlsMaterial {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

/// [`make_certificates`], with the server's files made readable by PostgreSQL when tests run
/// as root (PostgreSQL runs as `postgres` then, and reads its key only if it owns it, mode
/// 0600).
pub fn make_certificates_for_postgres(dir: &Path) -> TlsMaterial {
    use std::os::unix::fs::PermissionsExt;
    let tls = make_certificates(dir);
    if let Some((uid, gid)) = crate::postgres::run_as() {
        for file in [&tls.server_cert, &tls.server_key, &tls.ca_cert] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid)).expect("chown");
        }
    }
    std::fs::set_permissions(&tls.server_key, std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    tls
}
