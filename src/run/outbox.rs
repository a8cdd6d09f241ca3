//! `run` in notify mode: check that setup is complete, take the reader lock, listen, and read
//! the outbox through the pipeline; and the dry run's preview of new rows.

use super::{Failure, Session, Streamed, check_names, warn_if_stale};
use crate::pipeline::{self, SourceEnd};
use crate::source::notify::{self, NotifyError};
use crate::source::setup;

/// Notify mode: connects an ordinary session, checks that `setup` has put the outbox, the
/// functions and the triggers in place (permanent failure if not), takes the reader lock (a
/// standby if another instance holds it), listens, and reads the outbox until the connection
/// fails or shutdown; sets `streamed` once reading.
pub(super) async fn outbox_once(
    session: &mut Session<'_>,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    let config = session.config;
    let Session {
        live,
        links,
        health,
        progress,
        ..
    } = session;
    live.refresh();
    let (mut client, mut hints) = notify::connect(&config.postgres).await?;
    check_names(&mut client, live.rules()).await?;
    // `run` applies no DDL in notify mode: what `setup` would do must already be done, or
    // changes could be missed (a trigger that records too few columns) without anyone knowing.
    let mut actions = setup::notify::plan(&mut client, live.rules()).await?;
    // Except the truncate triggers of partitions attached after setup: the reader adds them.
    let repairs = setup::notify::partition_plan(&mut client, live.rules()).await?;
    actions.retain(|action| !repairs.iter().any(|(_, repair)| repair == action));
    warn_if_stale(&mut client, config, live.rules()).await?;
    if !actions.is_empty() {
        let missing: Vec<&str> = actions.iter().map(|a| a.why.as_str()).collect();
        return Err(Failure::Permanent(format!(
            "notify mode is not set up or out of date (setup would: {}); run `invalidator setup`",
            missing.join("; ")
        )));
    }
    // One reader at a time: the others wait as standbys until its session ends.
    if !notify::take_reader_lock(&client).await? {
        return Err(Failure::Transient {
            reason: "another instance reads the outbox".to_owned(),
            standby: true,
        });
    }
    client
        .batch_execute(&format!("LISTEN {}", setup::quote_ident(notify::CHANNEL)))
        .await
        .map_err(NotifyError::from)?;
    notify::prove_listen(&config.postgres, &mut hints).await?;
    *streamed = true;
    health.set_source(None);
    tracing::info!(channel = notify::CHANNEL, "reading the outbox");
    let (rules, queued) = (live.subscribe(), links.last_queued);
    let mut source =
        notify::OutboxSource::owner(&client, &mut hints, rules, progress, queued, health);
    let outcome = pipeline::run_source(&mut source, live, links, &config.pipeline).await;
    health.set_source(Some("reconnecting to postgres".to_owned()));
    match outcome? {
        SourceEnd::DeleterStopped => Ok(Streamed::Finished),
        SourceEnd::StreamEnded => Ok(Streamed::Ended),
    }
}

/// [`outbox_once`] for a dry run: no reader lock and no outbox row deleted (see
/// [`notify::OutboxSource::preview`]); an out-of-date setup is a warning, since previewing rules before
/// running `setup` is what a dry run is for.
pub(super) async fn dry_outbox_once(
    session: &mut Session<'_>,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    let config = session.config;
    let Session {
        live,
        links,
        health,
        ..
    } = session;
    live.refresh();
    let (mut client, mut hints) = notify::connect(&config.postgres).await?;
    check_names(&mut client, live.rules()).await?;
    let actions = setup::notify::plan(&mut client, live.rules()).await?;
    if !actions.is_empty() {
        let missing: Vec<&str> = actions.iter().map(|a| a.why.as_str()).collect();
        tracing::warn!(setup_would = %missing.join("; "),
            "dry run: notify mode is not set up or out of date for these rules; it shows what \
             the installed triggers let them see");
    }
    client
        .batch_execute(&format!("LISTEN {}", setup::quote_ident(notify::CHANNEL)))
        .await
        .map_err(NotifyError::from)?;
    *streamed = true;
    health.set_source(None);
    let mut progress = notify::Progress::default();
    let rules = live.subscribe();
    let mut source =
        notify::OutboxSource::preview(&client, &mut hints, rules, &mut progress, health).await?;
    let outcome = pipeline::run_source(&mut source, live, links, &config.pipeline).await;
    health.set_source(Some("reconnecting to postgres".to_owned()));
    match outcome? {
        // The delete loop deletes nothing here; wait for it so the last line is "stopped".
        SourceEnd::DeleterStopped => Ok(Streamed::Finished),
        SourceEnd::StreamEnded => Ok(Streamed::Ended),
    }
}
