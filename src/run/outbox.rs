//! `run` in notify mode: check that setup is complete, take the reader lock, listen, and read
//! the outbox through the pipeline; a dry run previews new rows instead.

use super::{Failure, Session, Streamed, check_names, warn_if_stale};
use crate::pipeline::{self, SourceEnd};
use crate::source::notify::{self, NotifyError};
use crate::source::setup;

/// Notify mode: connects an ordinary session, checks that `setup` has put the outbox, the
/// functions and the triggers in place, listens, and reads the outbox until the connection
/// fails or shutdown; sets `streamed` once reading.
///
/// The run proper is the one reader ([`claim_outbox`]) and deletes the rows it has delivered.
/// A dry run takes no lock and deletes no row (see [`notify::OutboxSource::preview`]), so it
/// can watch beside the running sidecar.
pub(super) async fn outbox_once(
    session: &mut Session<'_>,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    let (config, dry_run) = (session.config, session.dry_run);
    session.live.refresh();
    let (mut client, mut hints) = notify::connect(&config.postgres).await?;
    check_names(&mut client, session.live.rules()).await?;
    if dry_run {
        warn_if_not_set_up(&mut client, session).await?;
    } else {
        claim_outbox(&mut client, session).await?;
    }
    client
        .batch_execute(&format!("LISTEN {}", setup::quote_ident(notify::CHANNEL)))
        .await
        .map_err(NotifyError::from)?;
    if !dry_run {
        notify::prove_listen(&config.postgres, &mut hints).await?;
    }
    *streamed = true;
    let Session {
        live,
        links,
        health,
        progress,
        ..
    } = session;
    health.set_source(None);
    let rules = live.subscribe();
    // A dry run's rounds are its own: nothing it reads is ever deleted, so it keeps no
    // progress across connections.
    let mut preview_progress = notify::Progress::default();
    let mut source = if dry_run {
        let progress = &mut preview_progress;
        notify::OutboxSource::preview(&client, &mut hints, rules, progress, health).await?
    } else {
        tracing::info!(channel = notify::CHANNEL, "reading the outbox");
        let queued = links.last_queued;
        notify::OutboxSource::owner(&client, &mut hints, rules, progress, queued, health)
    };
    let outcome = pipeline::run_source(&mut source, live, links, &config.pipeline).await;
    health.set_source(Some("reconnecting to postgres".to_owned()));
    match outcome? {
        // In a dry run the delete loop deletes nothing; it is waited for all the same, so the
        // last line is "stopped".
        SourceEnd::DeleterStopped => Ok(Streamed::Finished),
        SourceEnd::StreamEnded => Ok(Streamed::Ended),
    }
}

/// Makes this instance the outbox's one reader: `run` applies no DDL in notify mode, so what
/// `setup` would do must already be done (or changes could be missed, by a trigger that
/// records too few columns, without anyone knowing); then the reader lock, which the others
/// wait for as standbys until this session ends.
async fn claim_outbox(
    client: &mut tokio_postgres::Client,
    session: &Session<'_>,
) -> Result<(), Failure> {
    let rules = session.live.rules();
    let mut actions = setup::notify::plan(client, rules).await?;
    // Except the truncate triggers of partitions attached after setup: the reader adds them.
    let repairs = setup::notify::partition_plan(client, rules).await?;
    actions.retain(|action| !repairs.iter().any(|(_, repair)| repair == action));
    warn_if_stale(client, session.config, rules).await?;
    if !actions.is_empty() {
        return Err(Failure::NotSetUp(
            actions.into_iter().map(|action| action.why).collect(),
        ));
    }
    if !notify::take_reader_lock(client).await? {
        return Err(Failure::Held(
            "another instance reads the outbox".to_owned(),
        ));
    }
    Ok(())
}

/// A dry run's check of setup: out of date is a warning, since previewing rules before running
/// `setup` is what a dry run is for.
async fn warn_if_not_set_up(
    client: &mut tokio_postgres::Client,
    session: &Session<'_>,
) -> Result<(), Failure> {
    let actions = setup::notify::plan(client, session.live.rules()).await?;
    if !actions.is_empty() {
        let missing: Vec<&str> = actions.iter().map(|a| a.why.as_str()).collect();
        tracing::warn!(setup_would = %missing.join("; "),
            "dry run: notify mode is not set up or out of date for these rules; it shows what \
             the installed triggers let them see");
    }
    Ok(())
}
