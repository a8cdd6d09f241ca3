//! Where the servers are and whom to trust: a Postgres URL as the connections read it, and the
//! PEM certificates of a CA file. Below both `config` (which validates them at load) and the
//! connections (which use them), so that neither reaches into the other.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Parses a Postgres URL (or `key=value` string) as tokio-postgres does, also accepting libpq's
/// `sslmode=verify-ca` and `sslmode=verify-full`: both become `require` (TLS or fail, the
/// certificate verified); the second value is whether the certificate must name the host, false
/// only for `verify-ca`.
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, bool), tokio_postgres::Error> {
    let mut text = url.to_owned();
    let mut check_host = true;
    for (mode, checks_host) in [("verify-full", true), ("verify-ca", false)] {
        let needle = format!("sslmode={mode}");
        let mut from = 0;
        while let Some(at) = text[from..].find(&needle).map(|i| i + from) {
            let starts = at == 0 || text[..at].ends_with(['?', '&', ' ', '\t', '\n']);
            let end = at + needle.len();
            let ends = text[end..]
                .chars()
                .next()
                .is_none_or(|c| c == '&' || c.is_whitespace());
            if starts && ends {
                text.replace_range(at..end, "sslmode=require");
                check_host = checks_host;
                from = at + "sslmode=require".len();
            } else {
                from = end;
            }
        }
    }
    Ok((text.parse()?, check_host))
}

/// Reads the PEM certificates of `path`; an unreadable file or one without any certificate is an
/// error, so a wrong path fails at startup rather than at the first handshake.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The value of `target_session_attrs` in a Postgres URL's query or a `key=value` string.
pub fn target_session_attrs(url: &str) -> Option<&str> {
    let pairs: Vec<&str> = match url.split_once('?') {
        Some((_, query)) if url.contains("://") => query.split('&').collect(),
        _ => url.split_whitespace().collect(),
    };
    pairs
        .into_iter()
        .find_map(|pair| pair.strip_prefix("target_session_attrs="))
}

#[cfg(test)]
mod tests {
    use tokio_postgres::config::SslMode;

    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_refused_with_its_path() {
        let err = load_ca_file(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = load_ca_file(empty.path()).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn verify_modes_become_require_and_only_verify_ca_skips_the_host_name() {
        for (url, check_host) in [
            ("postgres://u@h/db?sslmode=verify-full", true),
            ("postgres://u@h/db?sslmode=verify-ca", false),
            (
                "postgres://u@h/db?connect_timeout=3&sslmode=verify-ca&application_name=x",
                false,
            ),
            ("host=h user=u sslmode=verify-ca", false),
            ("host=h user=u sslmode=verify-full dbname=d", true),
        ] {
            let (config, checks) = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(config.get_ssl_mode(), SslMode::Require, "{url}");
            assert_eq!(checks, check_host, "{url}");
        }
        let (config, checks) = parse_url("postgres://u@h/db").unwrap();
        assert_eq!((config.get_ssl_mode(), checks), (SslMode::Prefer, true));
        // Only the whole parameter is rewritten.
        assert!(parse_url("postgres://u@h/db?sslmode=verify-fullx").is_err());
        assert_eq!(
            parse_url("postgres://u@h/db?application_name=sslmode=verify-ca")
                .unwrap()
                .0
                .get_ssl_mode(),
            SslMode::Prefer
        );
    }
}
