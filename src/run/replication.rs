//! `run` in replication mode: connect, check the history, repair publication and slot (replacing
//! a lost one with a crash-safe flush), then stream through the pipeline; and the dry run's
//! temporary slot.

use std::collections::BTreeSet;

use tokio::sync::mpsc;

use super::{Failure, Session, Streamed, check_names, warn_if_stale};
use crate::change::{Lsn, TableName};
use crate::config::Config;
use crate::dry_run;
use crate::pipeline::{self, Links, SourceEnd};
use crate::rules::{Invalidation, RuleSet};
use crate::source::history::{self, Seen};
use crate::source::replication::{
    CatchUp, ReplicationClient, ReplicationSource, ReplicationStream, SystemInfo,
};
use crate::source::setup::{self, SlotReset};
use crate::source::{connect, drift, invalidate};
use crate::telemetry;

/// The safety action after a lost or dropped slot, or a server on a new history: changes were
/// missed and nobody knows which, so every key and pattern the rules can produce is deleted.
/// It is the first transaction of the new history, queued once the temporary slot that will
/// become the new one exists, so whatever the old slot missed is covered and whatever the new
/// one reads is invalidated after it.
async fn flush_everything(rules: &RuleSet, links: &Links) {
    pipeline::queue_flush(&links.queue, links.history, rules.everything()).await;
}

/// Replaces the slot after `reset`, so that the flush it calls for survives a crash at any
/// instant: the new slot is made as a temporary one (it vanishes with this session), the flush
/// is queued and confirmed by Redis, and only then is the temporary slot copied into the
/// permanent one (`pg_copy_logical_replication_slot`: same position). Until the copy, the slot
/// is missing, so the next start flushes again. `Ok(false)` on shutdown.
async fn reset_slot(
    client: &mut ReplicationClient,
    session: &mut Session<'_>,
    reset: SlotReset,
) -> Result<bool, Failure> {
    let config = session.config;
    let Session {
        live,
        links,
        wal,
        health,
        ..
    } = session;
    let slot = &config.postgres.slot;
    metrics::counter!(telemetry::SLOT_RESETS_TOTAL, "reason" => reset.label()).increment(1);
    links.new_history();
    let server_end = wal.server_end;
    wal.new_history(server_end);
    let flush = config.postgres.flush_on_slot_loss;
    log_reset(slot, reset, &live.rules().everything(), flush);
    let temporary = dry_run::temporary_slot_name(slot, "reset", std::process::id());
    client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            setup::quote_ident(&temporary)
        ))
        .await?;
    if flush {
        flush_everything(live.rules(), links).await;
        health.set_source(Some(format!(
            "replacing replication slot {slot}: waiting for Redis to confirm the flush"
        )));
        if !flush_confirmed(links).await {
            return Ok(false);
        }
    } else {
        tracing::error!(slot = %slot, "the missed changes are NOT invalidated \
            (postgres.flush_on_slot_loss = false)");
    }
    make_permanent(client, &temporary, slot).await?;
    tracing::info!(slot = %slot, "replication slot replaced; the flush is confirmed");
    Ok(true)
}

/// Says, as an error, why `slot` is replaced and what the flush of `everything` will delete.
fn log_reset(slot: &str, reset: SlotReset, everything: &Invalidation, flush: bool) {
    let reason = format!("replication slot {slot} {}", reset.describe());
    let (keys, patterns) = (everything.keys.len(), everything.patterns.len());
    match reset {
        SlotReset::NewHistory(_) => tracing::error!(slot = %slot, reason = reset.label(),
            keys, patterns, flush,
            "{reason}: the server is on a new history, so changes were missed; forgetting \
             the old positions, replacing the slot and deleting every key the rules can \
             produce (unless postgres.flush_on_slot_loss = false)"),
        SlotReset::Dropped | SlotReset::Lost => tracing::error!(slot = %slot,
            reason = reset.label(), keys, patterns, flush,
            "{reason}: replication slot was lost or dropped, so changes were missed; \
             replacing it and deleting every key the rules can produce (unless \
             postgres.flush_on_slot_loss = false)"),
    }
}

/// Waits until Redis has confirmed the flush; `false` on shutdown. The flush is the first
/// transaction of the new history: confirmed once the confirmed position has reached that
/// history.
async fn flush_confirmed(links: &mut Links) -> bool {
    while links.confirmed.borrow().history < links.history {
        tokio::select! {
            biased;
            _ = links.cancel.cancelled() => return false,
            changed = links.confirmed.changed() => if changed.is_err() { return false },
        }
    }
    true
}

/// Copies the `temporary` slot into the permanent `slot` (same position), as a failover slot
/// where the server has them, and drops the temporary one.
async fn make_permanent(
    client: &mut ReplicationClient,
    temporary: &str,
    slot: &str,
) -> Result<(), Failure> {
    client
        .simple_query(&format!(
            "SELECT 1 FROM pg_copy_logical_replication_slot({}, {}, false)",
            setup::quote_literal(temporary),
            setup::quote_literal(slot)
        ))
        .await?;
    // The copy never carries the failover flag (and a temporary slot cannot have it).
    if setup::has_failover_slots(client).await? {
        client
            .simple_query(&format!(
                "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
                setup::quote_ident(slot)
            ))
            .await?;
    }
    client
        .simple_query(&format!(
            "SELECT pg_drop_replication_slot({})",
            setup::quote_literal(temporary)
        ))
        .await?;
    Ok(())
}

/// Connects, makes the slot ready and streams until the connection ends; sets `streamed` once
/// streaming has started.
///
/// The run proper streams from its slot: it checks that the server is on the history of our
/// positions and repairs the publication and the slot first ([`prepare_slot`]). A dry run reads
/// from a temporary slot of its own ([`temporary_slot`]), so the real one stays where it is.
pub(super) async fn stream_once(
    session: &mut Session<'_>,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    let (config, dry_run) = (session.config, session.dry_run);
    // Between connections is between transactions.
    session.live.refresh();
    let application_name = if dry_run {
        "invalidator-dry-run"
    } else {
        "invalidator"
    };
    let mut client = connect_replication(config, application_name).await?;
    check_names(&mut client, session.live.rules()).await?;
    let slot = if dry_run {
        temporary_slot(&mut client, session).await?
    } else {
        match prepare_slot(&mut client, session).await? {
            Some(slot) => slot,
            None => return Ok(Streamed::Finished),
        }
    };
    let stream = client
        .start_replication(
            &slot,
            Lsn(0),
            &config.postgres.publication,
            config.postgres.stream_large_transactions,
        )
        .await?;
    tracing::info!(slot = %slot, from = %session.wal.reported, "streaming");
    stream_until_end(stream, session, streamed).await
}

/// The run's slot, ready to stream from: not held by another instance, on the history of our
/// positions, with the publication and the slot repaired; `None` on shutdown.
async fn prepare_slot(
    client: &mut ReplicationClient,
    session: &mut Session<'_>,
) -> Result<Option<String>, Failure> {
    let config = session.config;
    // Asked before anything else is done: a standby would otherwise log and be refused at
    // START_REPLICATION, an ERROR in the server's log, on every attempt.
    if let Some(pid) = setup::slot_holder(client, &config.postgres.slot).await? {
        return Err(Failure::Held(format!(
            "replication slot {} is held by pid {pid}",
            config.postgres.slot
        )));
    }
    let system = client.identify_system().await?;
    tracing::info!(
        system_id = %system.system_id,
        timeline = system.timeline,
        wal = %system.xlog_pos,
        "connected"
    );
    warn_if_stale(client, config, session.live.rules()).await?;
    // What the publication hides is refused before anything is changed (only its owner can
    // repair that); a rule table replaced (or dropped from it) while no instance ran is
    // unpublished now: added back with the delete of its keys, before the stream starts, so the
    // delete is read after what the table missed. A missing publication is setup's to create.
    let publication = &config.postgres.publication;
    if setup::publication_exists(client, publication).await?
        && let Some(flush) = drift::repair(client, session.live.rules(), publication).await?
    {
        let links = &session.links;
        pipeline::queue_flush(&links.queue, links.history, flush).await;
    }
    if !repair_slot(client, session, &system).await? {
        return Ok(None);
    }
    // Never report less than the slot already has: an older position would be ignored at
    // best, and it could move the slot backwards on servers that do not guard against it. The
    // slot's position is one this server has written: one beyond its WAL was replaced above.
    let slot_name = &config.postgres.slot;
    let slot = setup::slot_info(client, slot_name).await?;
    let wal = &mut session.wal;
    if let Some(flush) = slot.and_then(|info| info.confirmed_flush) {
        wal.reported = wal.reported.max(flush);
        wal.server_end = wal.server_end.max(flush);
    }
    wal.catch_up = CatchUp::start(wal.reported, system.xlog_pos);
    Ok(Some(slot_name.clone()))
}

/// Checks that the server is on the history of our positions, then creates or repairs the
/// publication and the slot; a slot lost, dropped or on a new history is replaced with the flush
/// it calls for ([`reset_slot`]). `Ok(false)` on shutdown.
async fn repair_slot(
    client: &mut ReplicationClient,
    session: &mut Session<'_>,
    system: &SystemInfo,
) -> Result<bool, Failure> {
    let config = session.config;
    let slot_name = &config.postgres.slot;
    let before = setup::slot_info(client, slot_name).await?;
    let diverged = history::compare(
        client,
        session.seen.as_ref(),
        session.wal.reported,
        system,
        before.and_then(|info| info.confirmed_flush),
    )
    .await?;
    let mut tables: BTreeSet<TableName> = session.live.rules().tables().cloned().collect();
    if invalidate::has_requests(client).await? {
        tables.insert(invalidate::requests_table());
    }
    let plan = setup::plan(
        client,
        &tables,
        &config.postgres.publication,
        slot_name,
        setup::SlotLoss::Recreate,
        diverged,
    )
    .await?;
    setup::apply(client, &plan.actions).await?;
    session.seen = Some(Seen::of(system));
    session.wal.server_end = system.xlog_pos;
    match plan.reset {
        Some(reset) => reset_slot(client, session, reset).await,
        None => Ok(true),
    }
}

/// Connects a replication session as `[postgres]` says (URL, sslmode, CA).
async fn connect_replication(
    config: &Config,
    application_name: &str,
) -> Result<ReplicationClient, Failure> {
    let (pg, check_host) =
        crate::endpoint::parse_url(&config.postgres.url).map_err(Failure::Url)?;
    let ca_file = config.postgres.ca_file.as_deref();
    Ok(ReplicationClient::connect_with_tls(&pg, application_name, ca_file, check_host).await?)
}

/// Runs the source loop on a started stream until it ends, with a second, ordinary connection
/// that learns what partitions belong to and (not in a dry run) watches the publication; sets
/// `streamed` and keeps readiness in step.
async fn stream_until_end(
    mut stream: ReplicationStream,
    session: &mut Session<'_>,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    let (config, dry_run) = (session.config, session.dry_run);
    let Session {
        live,
        links,
        wal,
        health,
        ..
    } = session;
    let catalog = connect::connect(&config.postgres).await?;
    let recheck = tokio::sync::Notify::new();
    let mut rules = live.subscribe();
    let (queue, history) = (links.queue.clone(), links.history);
    *streamed = true;
    health.set_source(None);
    let mut ancestry = drift::Catalog::new(&catalog, &recheck);
    let mut source = ReplicationSource::new(&mut stream, &mut ancestry, wal, health);
    let source = pipeline::run_source(&mut source, live, links, &config.pipeline);
    let watcher = async {
        // A dry run changes nothing, so it does not repair the publication.
        if dry_run {
            return std::future::pending().await;
        }
        let publication = &config.postgres.publication;
        let (flush_tx, mut flushes) = mpsc::channel(1);
        let check =
            drift::watch_publication(&catalog, &mut rules, publication, &flush_tx, &recheck);
        let forward = async {
            while let Some(flush) = flushes.recv().await {
                pipeline::queue_flush(&queue, history, flush).await;
            }
        };
        tokio::select! {
            error = check => error,
            () = forward => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        biased;
        outcome = source => outcome,
        error = watcher => {
            health.set_source(Some("reconnecting to postgres".to_owned()));
            return Err(error.into());
        }
    };
    health.set_source(Some("reconnecting to postgres".to_owned()));
    match outcome? {
        SourceEnd::DeleterStopped => {
            stream.finish().await;
            Ok(Streamed::Finished)
        }
        SourceEnd::StreamEnded => Ok(Streamed::Ended),
    }
}

/// A dry run's slot: the publication must exist (a dry run creates nothing), and the slot is a
/// temporary one that starts at the current WAL position and disappears with the connection,
/// so the real slot stays where it is.
async fn temporary_slot(
    client: &mut ReplicationClient,
    session: &mut Session<'_>,
) -> Result<String, Failure> {
    let config = session.config;
    let publication = &config.postgres.publication;
    let tables = session.live.rules().tables().cloned().collect();
    let (existed, action) = setup::publication_action(client, &tables, publication).await?;
    if !existed {
        return Err(Failure::NoPublication(publication.clone()));
    }
    if let Some(action) = action {
        tracing::warn!(publication = %publication, missing = %action.sql,
            "dry run: the publication lacks tables of the rules; their changes are not shown \
             until `invalidator setup` adds them");
    }
    let slot = dry_run::temporary_slot_name(&config.postgres.slot, "dry_run", std::process::id());
    let command = format!(
        "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
        setup::quote_ident(&slot)
    );
    let rows = client.simple_query(&command).await?;
    let start = rows
        .first()
        .and_then(|row| row.get(1).cloned().flatten())
        .and_then(|lsn| lsn.parse::<Lsn>().ok())
        .unwrap_or(Lsn(0));
    let wal = &mut session.wal;
    wal.reported = wal.reported.max(start);
    wal.server_end = wal.server_end.max(start);
    tracing::info!(
        slot = %slot,
        real_slot = %config.postgres.slot,
        from = %start,
        "dry run: streaming from a temporary slot at the current WAL position; changes \
         committed before it are not shown (a temporary slot cannot see the past); the real \
         slot does not move and nothing is deleted"
    );
    Ok(slot)
}
