//! Test certificates: a fresh CA and a server certificate for 127.0.0.1, made with openssl, for
//! the TLS servers of the harness (Redis with `--tls-port`, Postgres with `ssl = on`).

use std::process::{Command, Stdio};

/// Writes `ca.crt`, `server.crt` and `server.key` (P-256, for 127.0.0.1) into `dir` with openssl
/// and returns the CA certificate.
pub fn make_certificates(dir: &std::path::Path) -> Vec<u8> {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=invalidator test CA",
        ],
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    ];
    openssl(dir, &steps);
    std::fs::read(dir.join("ca.crt")).expect("read ca.crt")
}

/// Writes `client.crt` and `client.key` (P-256, `clientAuth`) signed by the CA that
/// [`make_certificates`] left in `dir`, for servers that demand a client certificate.
pub fn make_client_certificate(dir: &std::path::Path) {
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
        .expect("write client.ext");
    let steps: [&[&str]; 2] = [
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=invalidator test client",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.crt",
            "-days",
            "2",
            "-extfile",
            "client.ext",
        ],
    ];
    openssl(dir, &steps);
}

/// Runs each of `steps` as an `openssl` command in `dir`; panics with its output on failure.
fn openssl(dir: &std::path::Path, steps: &[&[&str]]) {
    for args in steps {
        let out = Command::new("openssl")
            .args(*args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
