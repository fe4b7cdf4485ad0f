//! A file system that loses what was not fsynced, for power-cut tests (LazyFS's model, built
//! in-process on FUSE, and stricter about names): file data written or truncated stays in this
//! process's memory until an fsync of that file writes it through to a backing directory; names
//! (create, mkdir, rename) pass through at once but are journalled until an fsync of their
//! directory. `cut_power` forgets every unsynced write and undoes every unsynced new name and
//! rename, as a machine that loses power forgets its page cache. Unlinks stay done.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

const PAGE: u64 = 4096;
const ROOT: u64 = 1;
/// Attributes are never cached by the kernel: sizes change under it when power is cut.
const TTL: Duration = Duration::ZERO;

/// A file's data not yet fsynced: whole pages, over what the backing file holds.
#[derive(Default)]
struct Unsynced {
    /// The file's length as its writers see it.
    size: u64,
    /// Bytes of the backing file still part of the file (a truncation cuts this).
    backing_valid: u64,
    pages: HashMap<u64, Vec<u8>>,
}

#[derive(Default)]
struct State {
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    next_inode: u64,
    files: HashMap<u64, File>,
    unsynced: HashMap<u64, Unsynced>,
    /// Names made since their directory was last fsynced, oldest first (paths as they are now).
    names: Vec<NameChange>,
    /// fsyncs of files and directories seen (for the test's report).
    fsyncs: u64,
}

/// A name not yet durable: it goes at a power cut unless its directory was fsynced since.
#[derive(Debug, Clone)]
enum NameChange {
    Created(PathBuf),
    Renamed { from: PathBuf, to: PathBuf },
}

impl NameChange {
    /// The directory whose fsync makes the change durable.
    fn directory(&self) -> &Path {
        let path = match self {
            Self::Created(path) => path,
            Self::Renamed { to, .. } => to,
        };
        path.parent().unwrap_or(Path::new(""))
    }
}

/// Rewrites `path` if it is `from` or under it.
fn moved_path(path: &mut PathBuf, from: &Path, to: &Path) {
    if let Ok(rest) = path.strip_prefix(from) {
        *path = if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) };
    }
}

/// The handle a test keeps: it cuts the power, and counts.
#[derive(Clone)]
pub struct PowerSwitch {
    state: Arc<Mutex<State>>,
    backing: PathBuf,
}

impl PowerSwitch {
    /// Forgets every write not fsynced and undoes every name change whose directory was not
    /// fsynced since; returns how many files lost data and how many names were undone.
    pub fn cut_power(&self) -> (usize, usize) {
        let mut state = lock(&self.state);
        let lost = state.unsynced.len();
        state.unsynced.clear();
        state.files.clear();
        let mut names = std::mem::take(&mut state.names);
        let undone = names.len();
        while let Some(change) = names.pop() {
            match change {
                NameChange::Created(path) => {
                    let full = self.backing.join(&path);
                    let _ = if full.is_dir() { std::fs::remove_dir_all(&full) } else { std::fs::remove_file(&full) };
                    state.forget_under(&path);
                }
                NameChange::Renamed { from, to } => {
                    if std::fs::rename(self.backing.join(&to), self.backing.join(&from)).is_ok() {
                        state.rename_paths(&to, &from);
                        for earlier in &mut names {
                            match earlier {
                                NameChange::Created(path) => moved_path(path, &to, &from),
                                NameChange::Renamed { to: t, .. } => moved_path(t, &to, &from),
                            }
                        }
                    }
                }
            }
        }
        (lost, undone)
    }

    pub fn fsyncs(&self) -> u64 {
        lock(&self.state).fsyncs
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mounts the file system over `backing` at `mountpoint` (both existing directories). Unmounted
/// when the session is dropped. Fails where FUSE cannot be mounted (no /dev/fuse, no privilege).
pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<(fuser::BackgroundSession, PowerSwitch)> {
    let state = Arc::new(Mutex::new(State { next_inode: ROOT + 1, ..Default::default() }));
    {
        let mut s = lock(&state);
        s.paths.insert(ROOT, PathBuf::new());
        s.inodes.insert(PathBuf::new(), ROOT);
    }
    let fs = PowerCutFs { backing: backing.to_path_buf(), state: state.clone() };
    let options = [MountOption::FSName("imagelsh-powercut".into()), MountOption::RW];
    let session = fuser::spawn_mount2(fs, mountpoint, &options)?;
    Ok((session, PowerSwitch { state, backing: backing.to_path_buf() }))
}

struct PowerCutFs {
    backing: PathBuf,
    state: Arc<Mutex<State>>,
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl State {
    fn inode_of(&mut self, relative: PathBuf) -> u64 {
        if let Some(&ino) = self.inodes.get(&relative) {
            return ino;
        }
        let ino = self.next_inode;
        self.next_inode += 1;
        self.paths.insert(ino, relative.clone());
        self.inodes.insert(relative, ino);
        ino
    }

    /// Forgets `relative` and everything under it.
    fn forget_under(&mut self, relative: &Path) {
        let gone: Vec<PathBuf> = self.inodes.keys().filter(|p| p.starts_with(relative)).cloned().collect();
        for path in gone {
            self.forget_path(&path);
        }
    }

    fn forget_path(&mut self, relative: &Path) {
        self.names.retain(|change| !matches!(change, NameChange::Created(p) if p == relative));
        if let Some(ino) = self.inodes.remove(relative) {
            self.paths.remove(&ino);
            self.files.remove(&ino);
            self.unsynced.remove(&ino);
        }
    }

    /// Moves every path at or under `from` to `to`.
    fn rename_paths(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> =
            self.inodes.iter().filter(|(p, _)| p.starts_with(from)).map(|(p, &i)| (p.clone(), i)).collect();
        for (old, ino) in moved {
            let mut new = old.clone();
            moved_path(&mut new, from, to);
            self.inodes.remove(&old);
            self.inodes.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
    }
}

impl PowerCutFs {
    /// Removes a name (a file or an empty directory) at once: removals are not undone.
    fn remove(&self, parent: u64, name: &OsStr, op: fn(&Path) -> std::io::Result<()>, reply: ReplyEmpty) {
        let Some(relative) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        match op(&self.backing.join(&relative)) {
            Ok(()) => {
                lock(&self.state).forget_path(&relative);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn relative(&self, ino: u64) -> Option<PathBuf> {
        lock(&self.state).paths.get(&ino).cloned()
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.relative(parent).map(|p| p.join(name))
    }

    fn attr(&self, state: &State, ino: u64, relative: &Path) -> std::io::Result<FileAttr> {
        let meta = std::fs::symlink_metadata(self.backing.join(relative))?;
        let size = state.unsynced.get(&ino).map_or(meta.len(), |u| u.size);
        let kind = if meta.is_dir() { FileType::Directory } else { FileType::RegularFile };
        let time = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime()),
            mtime: time(meta.mtime()),
            ctime: time(meta.ctime()),
            crtime: time(meta.ctime()),
            kind,
            perm: (meta.permissions().mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn file<'a>(&self, state: &'a mut State, ino: u64) -> std::io::Result<&'a File> {
        if !state.files.contains_key(&ino) {
            let relative =
                state.paths.get(&ino).cloned().ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
            let file = OpenOptions::new().read(true).write(true).open(self.backing.join(relative))?;
            state.files.insert(ino, file);
        }
        Ok(&state.files[&ino])
    }

    /// The page as the file's readers see it, from memory or the backing file.
    fn page(&self, state: &mut State, ino: u64, index: u64) -> std::io::Result<Vec<u8>> {
        if let Some(page) = state.unsynced.get(&ino).and_then(|u| u.pages.get(&index)) {
            return Ok(page.clone());
        }
        let valid = match state.unsynced.get(&ino) {
            Some(u) => u.backing_valid,
            None => u64::MAX,
        };
        let mut page = vec![0u8; PAGE as usize];
        let start = index * PAGE;
        if start < valid {
            let file = self.file(state, ino)?;
            let mut read = 0;
            while read < page.len() {
                let n = file.read_at(&mut page[read..], start + read as u64)?;
                if n == 0 {
                    break;
                }
                read += n;
            }
            let keep = (valid - start).min(PAGE) as usize;
            page[keep..].fill(0);
        }
        Ok(page)
    }

    fn unsynced<'a>(&self, state: &'a mut State, ino: u64) -> std::io::Result<&'a mut Unsynced> {
        if !state.unsynced.contains_key(&ino) {
            let len = self.file(state, ino)?.metadata()?.len();
            state.unsynced.insert(ino, Unsynced { size: len, backing_valid: len, pages: HashMap::new() });
        }
        Ok(state.unsynced.get_mut(&ino).expect("inserted above"))
    }

    fn write_at(&self, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut state = lock(&self.state);
        self.unsynced(&mut state, ino)?;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let (index, within) = (at / PAGE, (at % PAGE) as usize);
            let mut page = self.page(&mut state, ino, index)?;
            let n = (PAGE as usize - within).min(data.len() - done);
            page[within..within + n].copy_from_slice(&data[done..done + n]);
            let unsynced = self.unsynced(&mut state, ino)?;
            unsynced.pages.insert(index, page);
            done += n;
        }
        let unsynced = self.unsynced(&mut state, ino)?;
        unsynced.size = unsynced.size.max(offset + data.len() as u64);
        Ok(())
    }

    fn truncate(&self, ino: u64, size: u64) -> std::io::Result<()> {
        let mut state = lock(&self.state);
        let unsynced = self.unsynced(&mut state, ino)?;
        unsynced.size = size;
        unsynced.backing_valid = unsynced.backing_valid.min(size);
        unsynced.pages.retain(|&index, _| index * PAGE < size);
        if let Some(page) = unsynced.pages.get_mut(&(size / PAGE)) {
            page[(size % PAGE) as usize..].fill(0);
        }
        Ok(())
    }

    fn sync(&self, ino: u64) -> std::io::Result<()> {
        let mut state = lock(&self.state);
        state.fsyncs += 1;
        let Some(unsynced) = state.unsynced.remove(&ino) else {
            return self.file(&mut state, ino)?.sync_all();
        };
        let file = self.file(&mut state, ino)?;
        file.set_len(unsynced.backing_valid)?;
        for (&index, page) in &unsynced.pages {
            let start = index * PAGE;
            let len = (unsynced.size.saturating_sub(start)).min(PAGE) as usize;
            file.write_all_at(&page[..len], start)?;
        }
        file.set_len(unsynced.size)?;
        file.sync_all()
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(relative) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        if std::fs::symlink_metadata(self.backing.join(&relative)).is_err() {
            return reply.error(libc::ENOENT);
        }
        let mut state = lock(&self.state);
        let ino = state.inode_of(relative.clone());
        match self.attr(&state, ino, &relative) {
            Ok(attr) => reply.entry(&TTL, &attr, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let state = lock(&self.state);
        let Some(relative) = state.paths.get(&ino).cloned() else { return reply.error(libc::ENOENT) };
        match self.attr(&state, ino, &relative) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(relative) = self.relative(ino) else { return reply.error(libc::ENOENT) };
        if let Some(mode) = mode
            && let Err(e) =
                std::fs::set_permissions(self.backing.join(&relative), std::fs::Permissions::from_mode(mode))
        {
            return reply.error(errno(&e));
        }
        if let Some(size) = size
            && let Err(e) = self.truncate(ino, size)
        {
            return reply.error(errno(&e));
        }
        let state = lock(&self.state);
        match self.attr(&state, ino, &relative) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let Some(relative) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        let path = self.backing.join(&relative);
        if let Err(e) = std::fs::create_dir(&path) {
            return reply.error(errno(&e));
        }
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        let mut state = lock(&self.state);
        state.names.push(NameChange::Created(relative.clone()));
        let ino = state.inode_of(relative.clone());
        match self.attr(&state, ino, &relative) {
            Ok(attr) => reply.entry(&TTL, &attr, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, |path| std::fs::remove_file(path), reply)
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, |path| std::fs::remove_dir(path), reply)
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        if flags != 0 {
            return reply.error(libc::EINVAL);
        }
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname)) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::rename(self.backing.join(&from), self.backing.join(&to)) {
            Ok(()) => {
                let mut state = lock(&self.state);
                state.forget_path(&to);
                state.rename_paths(&from, &to);
                for change in &mut state.names {
                    match change {
                        NameChange::Created(path) => moved_path(path, &from, &to),
                        NameChange::Renamed { to: t, .. } => moved_path(t, &from, &to),
                    }
                }
                state.names.push(NameChange::Renamed { from, to });
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let mut state = lock(&self.state);
        let is_dir = state.paths.get(&ino).is_some_and(|p| self.backing.join(p).is_dir());
        if !is_dir && let Err(e) = self.file(&mut state, ino) {
            return reply.error(errno(&e));
        }
        reply.opened(0, 0)
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(relative) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        let path = self.backing.join(&relative);
        let existed = path.exists();
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true);
        if flags & libc::O_EXCL != 0 {
            options.create_new(true);
        }
        let file = match options.open(&path) {
            Ok(file) => file,
            Err(e) => return reply.error(errno(&e)),
        };
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777));
        let mut state = lock(&self.state);
        if !existed {
            state.names.push(NameChange::Created(relative.clone()));
        }
        let ino = state.inode_of(relative.clone());
        state.files.insert(ino, file);
        if flags & libc::O_TRUNC != 0 {
            drop(state);
            if let Err(e) = self.truncate(ino, 0) {
                return reply.error(errno(&e));
            }
            state = lock(&self.state);
        }
        match self.attr(&state, ino, &relative) {
            Ok(attr) => reply.created(&TTL, &attr, 0, 0, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let mut state = lock(&self.state);
        let length = match state.unsynced.get(&ino) {
            Some(u) => u.size,
            None => match self.file(&mut state, ino).and_then(|f| f.metadata()) {
                Ok(meta) => meta.len(),
                Err(e) => return reply.error(errno(&e)),
            },
        };
        let offset = offset.max(0) as u64;
        let end = (offset + u64::from(size)).min(length);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (index, within) = (at / PAGE, (at % PAGE) as usize);
            let page = match self.page(&mut state, ino, index) {
                Ok(page) => page,
                Err(e) => return reply.error(errno(&e)),
            };
            let n = ((PAGE as usize) - within).min((end - at) as usize);
            out.extend_from_slice(&page[within..within + n]);
            at += n as u64;
        }
        reply.data(&out)
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        match self.write_at(ino, offset.max(0) as u64, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok()
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        match self.sync(ino) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut state = lock(&self.state);
        state.fsyncs += 1;
        let Some(dir) = state.paths.get(&ino).cloned() else { return reply.error(libc::ENOENT) };
        state.names.retain(|change| change.directory() != dir);
        reply.ok()
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let Some(relative) = self.relative(ino) else { return reply.error(libc::ENOENT) };
        let entries = match std::fs::read_dir(self.backing.join(&relative)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut listed: Vec<(u64, FileType, std::ffi::OsString)> =
            vec![(ino, FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into())];
        {
            let mut state = lock(&self.state);
            for entry in entries.flatten() {
                let kind = match entry.file_type() {
                    Ok(t) if t.is_dir() => FileType::Directory,
                    _ => FileType::RegularFile,
                };
                let child = state.inode_of(relative.join(entry.file_name()));
                listed.push((child, kind, entry.file_name()));
            }
        }
        for (i, (child, kind, name)) in listed.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(child, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, PAGE as u32, 255, PAGE as u32)
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _offset: i64,
        _length: i64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // No holes here: imagelsh keeps the bytes of a record it cannot punch out.
        reply.error(libc::EOPNOTSUPP)
    }
}
