//! The one file watcher: turns file events into "this database changed" and
//! "look at the watched directories and the configuration again".
//!
//! The watcher's thread calls [`Router::route`] for every event. It must stay
//! cheap there: a busy database writes its WAL thousands of times a second,
//! so an event for a database already queued (see [`Route`]) is dropped
//! without waking the loop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use notify::event::ModifyKind;
use notify::{EventKind, Watcher};
use tokio::sync::mpsc;
use tracing::{trace, warn};

/// What the watcher tells the loop.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Msg {
    /// A database's file or WAL changed.
    Db(usize),
    /// A watched directory or the configuration file changed.
    Rescan,
}

/// A database's slot, and whether a change of it is already on its way to
/// the loop: set here, cleared by the loop once a further event would tell
/// it something new.
pub(super) type Route = (usize, Arc<AtomicBool>);

/// Paths the watcher routes to a slot: a database and its WAL.
pub(super) type Routes = Arc<RwLock<HashMap<PathBuf, Route>>>;

/// Routes the watcher's events to the loop.
pub(super) struct Router {
    pub routes: Routes,
    /// The configuration file as named (its directory's links resolved)
    /// and as the link it may be resolves: an edit shows as either.
    pub config_files: Vec<PathBuf>,
    pub tx: mpsc::UnboundedSender<Msg>,
}

impl Router {
    pub fn route(&self, event: notify::Result<notify::Event>) {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "file watcher error");
                return;
            }
        };
        // The kernel dropped events (its queue overflowed): any database may
        // have changed unseen, and a file may have come or gone.
        if event.need_rescan() {
            warn!("the file watcher lost events; every database is looked at again");
            self.all_changed();
            let _ = self.tx.send(Msg::Rescan);
            return;
        }
        // Reads and metadata changes (our own included: SQLite running as
        // root chowns the WAL on every open) are no change to replicate.
        if matches!(
            event.kind,
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
        ) {
            return;
        }
        trace!(kind = ?event.kind, paths = ?event.paths, "file event");
        let appeared_or_left = matches!(
            event.kind,
            EventKind::Create(_)
                | EventKind::Remove(_)
                | EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Any
                | EventKind::Other
        );
        let mut rescan = false;
        {
            let Ok(routes) = self.routes.read() else {
                return;
            };
            for path in &event.paths {
                if let Some(route) = routes.get(path) {
                    self.queue(route);
                    if appeared_or_left {
                        rescan = true;
                    }
                } else if appeared_or_left || self.config_files.contains(path) {
                    rescan = true;
                }
            }
        }
        // The loop debounces rescans, so every trigger may be sent.
        if rescan {
            let _ = self.tx.send(Msg::Rescan);
        }
    }

    fn all_changed(&self) {
        let Ok(routes) = self.routes.read() else {
            return;
        };
        for route in routes.values() {
            self.queue(route);
        }
    }

    /// Tells the loop the database changed, unless that is already on its way.
    fn queue(&self, (id, queued): &Route) {
        if !queued.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(Msg::Db(*id));
        }
    }
}

/// Starts the watcher (`None` in poll mode: notify's PollWatcher compares
/// modification times in whole seconds, so a commit in the same second as its
/// last scan would go unseen; the loop stats the files itself instead).
pub(super) fn start(router: Router, poll: bool) -> notify::Result<Box<dyn Watcher + Send>> {
    if poll {
        return Ok(Box::new(notify::NullWatcher));
    }
    let watcher = notify::recommended_watcher(move |event| router.route(event))?;
    Ok(Box::new(watcher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::Event;
    use notify::event::{CreateKind, DataChange, Flag, MetadataKind};

    fn router(paths: &[(&str, usize)]) -> (Router, mpsc::UnboundedReceiver<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        // One flag per database, shared by its paths, as the loop makes them.
        let mut flags: HashMap<usize, Arc<AtomicBool>> = HashMap::new();
        let mut routes = HashMap::new();
        for (path, id) in paths {
            let flag = flags.entry(*id).or_default().clone();
            routes.insert(PathBuf::from(path), (*id, flag));
        }
        let router = Router {
            routes: Arc::new(RwLock::new(routes)),
            config_files: vec![PathBuf::from("/etc/walsync.toml")],
            tx,
        };
        (router, rx)
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Msg>) -> Vec<Msg> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn write(path: &str) -> notify::Result<Event> {
        Ok(
            Event::new(EventKind::Modify(ModifyKind::Data(DataChange::Content)))
                .add_path(PathBuf::from(path)),
        )
    }

    #[test]
    fn a_database_already_queued_is_not_sent_again() {
        let (r, mut rx) = router(&[("/d/a.db-wal", 1), ("/d/b.db-wal", 2)]);
        for _ in 0..1000 {
            r.route(write("/d/a.db-wal"));
        }
        r.route(write("/d/b.db-wal"));
        assert_eq!(drain(&mut rx), vec![Msg::Db(1), Msg::Db(2)]);
        // The loop clears the flag once another event would tell it something.
        r.routes.read().unwrap()[&PathBuf::from("/d/a.db-wal")]
            .1
            .store(false, Ordering::Release);
        r.route(write("/d/a.db-wal"));
        assert_eq!(drain(&mut rx), vec![Msg::Db(1)]);
    }

    #[test]
    fn lost_events_count_as_a_change_of_every_database_and_a_rescan() {
        let (r, mut rx) = router(&[("/d/a.db", 1), ("/d/a.db-wal", 1), ("/d/b.db-wal", 2)]);
        r.route(write("/d/b.db-wal"));
        assert_eq!(drain(&mut rx), vec![Msg::Db(2)]);
        // notify's inotify backend reports a queue overflow like this.
        r.route(Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan)));
        let msgs = drain(&mut rx);
        // Database 2 is still queued; database 1 is sent once for its two paths.
        assert_eq!(msgs, vec![Msg::Db(1), Msg::Rescan]);
    }

    #[test]
    fn reads_and_metadata_are_no_change() {
        let (r, mut rx) = router(&[("/d/a.db-wal", 1)]);
        r.route(Ok(Event::new(EventKind::Access(
            notify::event::AccessKind::Any,
        ))
        .add_path(PathBuf::from("/d/a.db-wal"))));
        r.route(Ok(Event::new(EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::Ownership,
        )))
        .add_path(PathBuf::from("/d/a.db-wal"))));
        assert_eq!(drain(&mut rx), vec![]);
    }

    #[test]
    fn files_coming_and_the_configuration_changing_ask_for_a_rescan() {
        let (r, mut rx) = router(&[("/d/a.db", 1)]);
        r.route(Ok(
            Event::new(EventKind::Create(CreateKind::File)).add_path(PathBuf::from("/d/new.db"))
        ));
        assert_eq!(drain(&mut rx), vec![Msg::Rescan]);
        r.route(write("/etc/walsync.toml"));
        assert_eq!(drain(&mut rx), vec![Msg::Rescan]);
        // A write to a file nobody replicates is nothing.
        r.route(write("/d/other.log"));
        assert_eq!(drain(&mut rx), vec![]);
        // A replicated database removed: its slot hears of it, and a rescan.
        r.route(Ok(Event::new(EventKind::Remove(
            notify::event::RemoveKind::File,
        ))
        .add_path(PathBuf::from("/d/a.db"))));
        assert_eq!(drain(&mut rx), vec![Msg::Db(1), Msg::Rescan]);
    }
}
