//! Lazily allocated arrays of atomic cells: memory follows the indexes touched, not the length.
//!
//! A [`Chunked`] array of `len` cells is cut into chunks of `N` cells. A chunk is allocated
//! (zeroed) the first time a cell in it is written through [`Chunked::get_or_install`];
//! reading a cell of a missing chunk reads zero without allocating. Chunks hang off a
//! two-level directory: a top array of `ceil(len / (N * NODE_CHUNKS))` lazily filled node
//! slots, each node holding [`NODE_CHUNKS`] lazily filled chunk slots. An empty array of 2^26
//! cells (a bitmap of 2^32 blocks) at 16 cells per chunk costs a top array of 8192 slots (64
//! KiB).
//!
//! Memory when writes are spread uniformly: once every node is installed (a node covers
//! `N * NODE_CHUNKS` cells, so a few writes per node suffice), the directory costs 8 bytes per
//! chunk slot of the whole array, whatever `NODE_CHUNKS` is, plus each chunk touched. Small
//! chunks waste less on cells never written but raise that per-slot cost, so users pick `N`
//! with both in view (see `bitmap.rs`).
//!
//! Invariants:
//! - Installing is lock-free: a slot is filled by `compare_exchange` from null
//!   (`once_cell::race::OnceBox`); when two threads race to fill a slot, the loser frees its
//!   own allocation and uses the winner's. Once a chunk exists, reaching a cell is two
//!   `Acquire` loads and two pointer hops, and never allocates.
//! - The `Acquire` load of a slot pairs with the installer's `Release` (AcqRel) exchange, so a
//!   thread that sees a chunk sees it zeroed (never garbage), whatever the cells' own ordering.
//! - Chunks are never freed while the array lives: memory is proportional to the chunks ever
//!   touched over the array's life. Freeing one safely would need every reader and writer to
//!   be quiescent (a writer may hold a reference to a cell of it); dropping the whole array is
//!   the one quiescent point, and `Drop` is ordinary ownership.
//! - Each chunk carries a `hint` flag its user may set when a chunk becomes non-empty, and each
//!   node a `hint` its user may set when one of its chunk hints becomes set, so a sweep
//!   ([`Chunked::hinted_chunks`]) skips whole nodes, then chunks, with nothing to take (see
//!   `bitmap.rs` for the protocol). Without the node hint a sweep of a fully installed
//!   directory reads every chunk slot even when nothing was written since the last one.
//! - `installed_bytes` counts the nodes and chunks installed, each by the thread that won its
//!   slot (a loser's allocation is freed and not counted), so [`Chunked::allocated_bytes`] is
//!   one load, cheap enough for every listing and `/metrics` scrape. `Relaxed`: it is a
//!   figure for humans, ordered with nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use once_cell::race::OnceBox;

/// Chunk slots per directory node (a node is 4 KiB of pointers).
pub const NODE_CHUNKS: usize = 512;

/// One allocated run of `N` cells and its non-empty hint.
#[derive(Debug)]
pub struct Chunk<T, const N: usize> {
    /// Set by writers when the chunk may hold something to take; cleared by a sweep.
    pub hint: AtomicBool,
    /// The cells, zero when installed.
    pub cells: [T; N],
}

/// A node of the directory: [`NODE_CHUNKS`] chunk slots and their hint.
struct Node<T, const N: usize> {
    /// Set by writers when a chunk hint of this node became set; cleared by a sweep.
    hint: AtomicBool,
    chunks: [OnceBox<Chunk<T, N>>; NODE_CHUNKS],
}

/// A cell reached for writing ([`Chunked::get_or_install`]), with the hints above it.
pub struct Installed<'a, T, const N: usize> {
    /// The hint of the node holding the chunk.
    pub node_hint: &'a AtomicBool,
    /// The chunk holding the cell.
    pub chunk: &'a Chunk<T, N>,
    /// The cell.
    pub cell: &'a T,
}

/// A lazily allocated array of `len` atomic cells; see the module docs.
pub struct Chunked<T, const N: usize> {
    len: u64,
    nodes: Box<[OnceBox<Node<T, N>>]>,
    /// Bytes of the nodes and chunks installed so far (never decreases).
    installed_bytes: AtomicU64,
}

impl<T: Default, const N: usize> std::fmt::Debug for Chunked<T, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunked")
            .field("len", &self.len)
            .field("chunks_installed", &self.chunks().count())
            .finish_non_exhaustive()
    }
}

impl<T: Default, const N: usize> Chunked<T, N> {
    /// Cells per chunk, as a `u64`.
    const CHUNK_LEN: u64 = N as u64;
    /// Cells per directory node.
    const NODE_LEN: u64 = N as u64 * NODE_CHUNKS as u64;

    /// An array of `len` cells, none allocated.
    pub fn new(len: u64) -> Self {
        let node_count = usize::try_from(len.div_ceil(Self::NODE_LEN)).expect("directory fits");
        let nodes = (0..node_count).map(|_| OnceBox::new()).collect();
        Self {
            len,
            nodes,
            installed_bytes: AtomicU64::new(0),
        }
    }

    /// Number of cells.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Splits a cell index in (node, chunk slot in node, cell in chunk); out of range is a bug.
    fn split(&self, index: u64) -> (usize, usize, usize) {
        assert!(
            index < self.len,
            "cell {index} out of range (length {})",
            self.len
        );
        let node = usize::try_from(index / Self::NODE_LEN).expect("checked against len");
        // Both remainders are below small constants, so the casts cannot truncate.
        let slot = ((index / Self::CHUNK_LEN) % NODE_CHUNKS as u64) as usize;
        let cell = (index % Self::CHUNK_LEN) as usize;
        (node, slot, cell)
    }

    /// The chunk numbered `chunk`, if installed.
    pub fn chunk(&self, chunk: u64) -> Option<&Chunk<T, N>> {
        let (node, slot, _) = self.split(chunk * Self::CHUNK_LEN);
        self.nodes[node].get()?.chunks[slot].get()
    }

    /// Cell `index`, if its chunk is installed (a missing chunk reads as all zero).
    pub fn get(&self, index: u64) -> Option<&T> {
        self.get_or_gap(index).ok()
    }

    /// Cell `index`, or, when its chunk is missing, `Err` with the first index past the
    /// missing chunk or, when the whole node is missing, past the node (capped at `len`), so
    /// a scan of never-written space skips a node per step rather than a chunk.
    pub fn get_or_gap(&self, index: u64) -> Result<&T, u64> {
        let (node, slot, cell) = self.split(index);
        let Some(chunks) = self.nodes[node].get() else {
            return Err(((index / Self::NODE_LEN + 1) * Self::NODE_LEN).min(self.len));
        };
        match chunks.chunks[slot].get() {
            Some(chunk) => Ok(&chunk.cells[cell]),
            None => Err(((index / Self::CHUNK_LEN + 1) * Self::CHUNK_LEN).min(self.len)),
        }
    }

    /// Cell `index`, its chunk and its node's hint, installing the node and chunk (zeroed) if
    /// needed.
    pub fn get_or_install(&self, index: u64) -> Installed<'_, T, N> {
        let (node, slot, cell) = self.split(index);
        let node = self.install(&self.nodes[node], || Node {
            hint: AtomicBool::new(false),
            chunks: std::array::from_fn(|_| OnceBox::new()),
        });
        let chunk = self.install(&node.chunks[slot], || Chunk {
            hint: AtomicBool::new(false),
            cells: std::array::from_fn(|_| T::default()),
        });
        Installed {
            node_hint: &node.hint,
            chunk,
            cell: &chunk.cells[cell],
        }
    }

    /// The value in `slot`, made by `make` and installed if empty; counts the bytes when this
    /// thread's allocation is the one installed.
    fn install<'a, V>(&self, slot: &'a OnceBox<V>, make: impl FnOnce() -> V) -> &'a V {
        if let Some(value) = slot.get() {
            return value;
        }
        if slot.set(Box::new(make())).is_ok() {
            let bytes = std::mem::size_of::<V>() as u64;
            self.installed_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        slot.get()
            .expect("installed by this thread or by the winner of the race")
    }

    /// Installed chunks as `(chunk number, chunk)`, in increasing order; chunks installed
    /// during the walk may or may not be listed.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, &Chunk<T, N>)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(node, slot)| Some((node, slot.get()?)))
            .flat_map(|(node, chunks)| {
                let first = node as u64 * NODE_CHUNKS as u64;
                (first..)
                    .zip(chunks.chunks.iter())
                    .filter_map(|(number, slot)| Some((number, slot.get()?)))
            })
    }

    /// Installed chunks of the nodes whose hint was set, as `(chunk number, chunk)` in
    /// increasing order, clearing each node hint (`swap(false, Acquire)`, pairing with the
    /// writer's `Release` RMW that set it) before walking the node's slots.
    pub fn hinted_chunks(&self) -> impl Iterator<Item = (u64, &Chunk<T, N>)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(node, slot)| Some((node, slot.get()?)))
            .filter(|(_, chunks)| chunks.hint.swap(false, Ordering::Acquire))
            .flat_map(|(node, chunks)| {
                let first = node as u64 * NODE_CHUNKS as u64;
                (first..)
                    .zip(chunks.chunks.iter())
                    .filter_map(|(number, slot)| Some((number, slot.get()?)))
            })
    }

    /// Heap bytes held now: the top array, installed nodes and installed chunks. One load.
    pub fn allocated_bytes(&self) -> u64 {
        let top = std::mem::size_of_val(&*self.nodes) as u64;
        top + self.installed_bytes.load(Ordering::Relaxed)
    }

    /// [`Chunked::allocated_bytes`] recounted by walking the directory (tests check the
    /// counter against it).
    #[cfg(test)]
    fn allocated_bytes_walked(&self) -> u64 {
        let top = std::mem::size_of_val(&*self.nodes) as u64;
        let nodes = self.nodes.iter().filter(|n| n.get().is_some()).count() as u64;
        let chunks = self.chunks().count() as u64;
        top + nodes * std::mem::size_of::<Node<T, N>>() as u64
            + chunks * std::mem::size_of::<Chunk<T, N>>() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn reads_do_not_install_and_writes_install_one_chunk() {
        // Goal: memory follows writes. Method: read everywhere, write two cells, count chunks.
        let array: Chunked<AtomicU64, 8> = Chunked::new(10_000);
        assert!(array.get(9_999).is_none());
        assert_eq!(array.chunks().count(), 0);
        let empty = array.allocated_bytes();
        array.get_or_install(17).cell.store(5, Ordering::Relaxed);
        array.get_or_install(9_999).cell.store(6, Ordering::Relaxed);
        array.get_or_install(16).cell.store(7, Ordering::Relaxed);
        let numbers: Vec<u64> = array.chunks().map(|(n, _)| n).collect();
        assert_eq!(numbers, vec![2, 1249]);
        assert_eq!(array.get(17).map(|c| c.load(Ordering::Relaxed)), Some(5));
        assert_eq!(array.get(18).map(|c| c.load(Ordering::Relaxed)), Some(0));
        assert!(array.chunk(3).is_none());
        // A missing chunk in an installed node skips one chunk; a missing node skips the node.
        assert_eq!(array.get_or_gap(30).err(), Some(32));
        let array_of_nodes: Chunked<AtomicU64, 8> = Chunked::new(3 * 8 * NODE_CHUNKS as u64 + 5);
        array_of_nodes.get_or_install(0);
        assert_eq!(array_of_nodes.get_or_gap(9).err(), Some(16));
        let node_len = 8 * NODE_CHUNKS as u64;
        assert_eq!(
            array_of_nodes.get_or_gap(node_len + 1).err(),
            Some(2 * node_len)
        );
        assert_eq!(
            array_of_nodes.get_or_gap(3 * node_len).err(),
            Some(3 * node_len + 5)
        );
        // Only nodes whose hint is set are walked, and walking clears the hint.
        array_of_nodes.get_or_install(2 * node_len + 1);
        let installed = array_of_nodes.get_or_install(2 * node_len + 9);
        installed.node_hint.store(true, Ordering::Relaxed);
        let hinted: Vec<u64> = array_of_nodes.hinted_chunks().map(|(n, _)| n).collect();
        assert_eq!(
            hinted,
            vec![2 * NODE_CHUNKS as u64, 2 * NODE_CHUNKS as u64 + 1]
        );
        assert_eq!(array_of_nodes.hinted_chunks().count(), 0);
        assert_eq!(array_of_nodes.chunks().count(), 3);
        assert!(array.allocated_bytes() > empty);
        assert_eq!(array.allocated_bytes(), array.allocated_bytes_walked());
    }

    #[test]
    fn racing_installs_agree_on_one_chunk() {
        // Goal: concurrent first writes to one chunk all land. Method: 4 threads each add to
        // every cell of fresh chunks; sums must be exact.
        let array: Chunked<AtomicU64, 64> = Chunked::new(64 * 1024);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for index in 0..array.len() {
                        array
                            .get_or_install(index)
                            .cell
                            .fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(array.chunks().count(), 1024);
        // Losers of install races freed their allocations and did not count them.
        assert_eq!(array.allocated_bytes(), array.allocated_bytes_walked());
        for index in 0..array.len() {
            assert_eq!(array.get(index).map(|c| c.load(Ordering::Relaxed)), Some(4));
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn index_past_len_panics() {
        // Goal: an index past the end is a bug. Method: get(len).
        let array: Chunked<AtomicU64, 8> = Chunked::new(8);
        let _ = array.get(8);
    }
}
