//! Where the servers are and whom to trust: a Postgres URL as the connections read it, the
//! order its hosts are tried in and how long each may take, and the PEM certificates of a CA
//! file. Below both `config` (which validates them at load) and the connections (which use
//! them), so that neither reaches into the other.
//!
//! ```text
//! postgres://u@a:1,b:2/db?connect_timeout=3     (or host=a,b port=1,2 ...)
//!   first_to_answer: a:1 ─(refused, or no answer within 3 s)─▶ b:2 ─▶ ... ─▶ the last failure
//!   the same loop for the replication connection and for the SQL sessions (single_host)
//! ```

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::Host;

/// The port Postgres listens on when the configuration names none.
const DEFAULT_PORT: u16 = 5432;

/// How long one host may take when the URL sets no `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// How long one attempt at one host may take, from the TCP connect to a session ready for
/// queries: the URL's `connect_timeout`, else 10 s. Without a bound, a server that accepts the
/// connection and never answers (hung, or behind a dropped network) would hold the caller, and
/// the hosts after it, for the operating system's TCP timeout or forever.
pub fn attempt_timeout(config: &tokio_postgres::Config) -> Duration {
    config
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT)
}

/// How many hosts `config` names: each of `host` and `hostaddr` lists them (tokio-postgres
/// checks that both lists, when given, are as long); one for neither, the default host.
fn candidates(config: &tokio_postgres::Config) -> usize {
    config
        .get_hosts()
        .len()
        .max(config.get_hostaddrs().len())
        .max(1)
}

/// The port of host number `candidate`: its own, or the one port given for every host.
pub fn port(config: &tokio_postgres::Config, candidate: usize) -> u16 {
    let ports = config.get_ports();
    ports
        .get(candidate)
        .or(ports.first())
        .copied()
        .unwrap_or(DEFAULT_PORT)
}

/// Host number `candidate` as messages name it: `host:port` (the address for a `hostaddr`
/// without a name, the socket file for a Unix directory). A URL's password is never part of it.
pub fn host_label(config: &tokio_postgres::Config, candidate: usize) -> String {
    let port = port(config, candidate);
    match (
        config.get_hosts().get(candidate),
        config.get_hostaddrs().get(candidate),
    ) {
        (Some(Host::Tcp(host)), _) => format!("{host}:{port}"),
        (_, Some(addr)) => format!("{addr}:{port}"),
        #[cfg(unix)]
        (Some(Host::Unix(dir)), None) => dir.join(format!(".s.PGSQL.{port}")).display().to_string(),
        (None, None) => format!("the default host, port {port}"),
    }
}

/// `config` narrowed to host number `candidate` (its `host`, `hostaddr` and port), every other
/// setting kept, so that tokio-postgres, which tries all hosts of a config within one unbounded
/// attempt, tries just this one.
pub fn single_host(config: &tokio_postgres::Config, candidate: usize) -> tokio_postgres::Config {
    let mut one = tokio_postgres::Config::new();
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(password) = config.get_password() {
        one.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(name) = config.get_application_name() {
        one.application_name(name);
    }
    if let Some(timeout) = config.get_connect_timeout() {
        one.connect_timeout(*timeout);
    }
    if let Some(timeout) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(*timeout);
    }
    if let Some(interval) = config.get_keepalives_interval() {
        one.keepalives_interval(interval);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        one.keepalives_retries(retries);
    }
    one.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation())
        .keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle())
        .target_session_attrs(config.get_target_session_attrs())
        .channel_binding(config.get_channel_binding())
        .load_balance_hosts(config.get_load_balance_hosts());
    match config.get_hosts().get(candidate) {
        Some(Host::Tcp(host)) => {
            one.host(host);
        }
        #[cfg(unix)]
        Some(Host::Unix(dir)) => {
            one.host_path(dir);
        }
        None => {}
    }
    if let Some(addr) = config.get_hostaddrs().get(candidate) {
        one.hostaddr(*addr);
    }
    if !config.get_ports().is_empty() {
        one.port(port(config, candidate));
    }
    one
}

/// Tries the hosts of `config` in the order the URL lists them, as libpq does
/// (`load_balance_hosts=random` shuffles only the addresses of one host name: the sidecar wants
/// the primary, not a spread of its sessions): `attempt` with
/// each host's number, each bounded by [`attempt_timeout`] (`timed_out` builds the error for one
/// that did not answer in time, given its [`host_label`] and the bound), until one succeeds. A
/// failure for which `ends_search` holds (one no other host can mend) is the answer at once;
/// otherwise the last host's failure is.
pub async fn first_to_answer<T, E, F>(
    config: &tokio_postgres::Config,
    mut attempt: impl FnMut(usize) -> F,
    timed_out: impl Fn(String, Duration) -> E,
    ends_search: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let limit = attempt_timeout(config);
    let hosts = candidates(config);
    let mut candidate = 0;
    loop {
        let result = tokio::time::timeout(limit, attempt(candidate))
            .await
            .unwrap_or_else(|_| Err(timed_out(host_label(config, candidate), limit)));
        match result {
            Ok(connected) => return Ok(connected),
            Err(err) if ends_search(&err) || candidate + 1 >= hosts => return Err(err),
            Err(err) => {
                tracing::debug!(
                    host = %host_label(config, candidate),
                    error = %err,
                    "postgres host passed over"
                );
                candidate += 1;
            }
        }
    }
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

    #[test]
    fn one_host_of_several_keeps_every_other_setting() {
        let settings = "dbname=d user=u password=s3cret options=-cx=1 application_name=a \
                        sslmode=require sslnegotiation=direct connect_timeout=3 \
                        tcp_user_timeout=4 keepalives=0 keepalives_idle=5 keepalives_interval=6 \
                        keepalives_retries=7 target_session_attrs=read-write \
                        channel_binding=disable load_balance_hosts=random";
        let several: tokio_postgres::Config =
            format!("host=a,b,c hostaddr=10.0.0.1,10.0.0.2,10.0.0.3 port=1,2,3 {settings}")
                .parse()
                .unwrap();
        let second: tokio_postgres::Config = format!("host=b hostaddr=10.0.0.2 port=2 {settings}")
            .parse()
            .unwrap();
        assert!(
            single_host(&several, 1) == second,
            "{:?}",
            single_host(&several, 1)
        );
        // One port for all hosts, and none at all.
        let (url, _) = parse_url("host=a,b port=7 user=u").unwrap();
        assert!(single_host(&url, 1) == "host=b port=7 user=u".parse().unwrap());
        let (url, _) = parse_url("host=a,/run/pg user=u").unwrap();
        assert!(single_host(&url, 1) == "host=/run/pg user=u".parse().unwrap());
    }

    #[test]
    fn hosts_are_named_with_their_port_and_never_with_the_password() {
        let (url, _) =
            parse_url("host=db.example.com,10.0.0.2 port=6432 user=u password=s3cret").unwrap();
        assert_eq!(host_label(&url, 0), "db.example.com:6432");
        assert_eq!(host_label(&url, 1), "10.0.0.2:6432");
        let url: tokio_postgres::Config =
            "hostaddr=10.0.0.9 user=u password=s3cret".parse().unwrap();
        assert_eq!(host_label(&url, 0), "10.0.0.9:5432");
        let url: tokio_postgres::Config = "host=/run/pg port=5433 user=u".parse().unwrap();
        assert_eq!(host_label(&url, 0), "/run/pg/.s.PGSQL.5433");
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_that_never_answers_is_passed_over_after_the_timeout() {
        let (url, _) = parse_url("postgres://u@a,b,c/db?connect_timeout=2").unwrap();
        let mut tried = Vec::new();
        let answer: Result<usize, String> = first_to_answer(
            &url,
            |candidate| {
                tried.push(candidate);
                async move {
                    match candidate {
                        0 => std::future::pending().await,
                        1 => Err("refused".to_owned()),
                        _ => Ok(candidate),
                    }
                }
            },
            |host, after| format!("{host} timed out after {after:?}"),
            |_| false,
        )
        .await;
        assert_eq!(answer, Ok(2));
        assert_eq!(tried, [0, 1, 2]);
        // The last failure is the answer, unless one ends the search at once.
        let (url, _) = parse_url("postgres://u@a,b/db?connect_timeout=2").unwrap();
        let last: Result<(), String> = first_to_answer(
            &url,
            |_| std::future::pending(),
            |host, after| format!("{host} timed out after {after:?}"),
            |_| false,
        )
        .await;
        assert_eq!(last, Err("b:5432 timed out after 2s".to_owned()));
        let first: Result<(), String> = first_to_answer(
            &url,
            |candidate| async move { Err(format!("{candidate} is a pooler")) },
            |host, _| host,
            |err| err.contains("pooler"),
        )
        .await;
        assert_eq!(first, Err("0 is a pooler".to_owned()));
    }
}
