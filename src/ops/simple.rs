//! The operations that are one call on the transfer's storage: zero,
//! extents, checksum and flush. Each waits for every NBD command it started
//! before it returns, also when it fails.

use std::sync::Arc;

use serde::Serialize;

use super::{open, OpError, OpLog};
use crate::checksum;
use crate::extents::{self, DirtyExtent, Extent};
use crate::transfers::Transfer;

/// Makes `size` bytes at `offset` read as zeroes (clamped to the end of the
/// image), then flushes when asked. Returns the bytes zeroed, also counted
/// in the transfer's stats.
pub(crate) async fn zero(
    t: &Arc<Transfer>,
    offset: u64,
    size: u64,
    flush: bool,
    log: &mut OpLog,
) -> Result<u64, OpError> {
    let mut h = open(t).await?;
    let image_size = h.size();
    if h.caps()?.read_only {
        return Err(OpError::ReadOnly);
    }
    if offset >= image_size {
        return Err(OpError::OffsetPastEnd);
    }
    let n = size.min(image_size - offset);
    let mut r = h.zero(offset, n).await;
    if r.is_ok() && flush {
        r = h.flush().await;
    }
    let zeroed = r.map(|_| n).map_err(|e| {
        log::error!("PATCH zero error err={e}");
        OpError::from(e)
    })?;
    log.bytes = zeroed;
    t.stats().add_zeroed(zeroed);
    Ok(zeroed)
}

/// A transfer's extents (see [`extents()`]).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum ExtentList {
    Allocation(Vec<Extent>),
    Dirty(Vec<DirtyExtent>),
}

/// The allocation extents of the whole image, or with `dirty` those merged
/// with the configured dirty bitmap (every extent dirty when there is none
/// or the export does not offer it).
pub(crate) async fn extents(t: &Arc<Transfer>, dirty: bool) -> Result<ExtentList, OpError> {
    let mut h = open(t).await?;
    let list = async {
        if !dirty {
            return Ok(ExtentList::Allocation(h.allocation_extents().await?));
        }
        Ok(ExtentList::Dirty(match h.dirty_extents().await? {
            Some(list) => list,
            None => extents::all_dirty(&h.allocation_extents().await?),
        }))
    };
    list.await.map_err(|e: crate::backend::BackendError| {
        log::error!("EXTENTS error image_id={} err={e}", t.id());
        OpError::from(e)
    })
}

/// The checksum of the whole image (see [`checksum()`]).
pub(crate) async fn checksum(
    t: &Arc<Transfer>,
    params: checksum::Params,
    log: &mut OpLog,
) -> Result<checksum::Checksum, OpError> {
    let mut h = open(t).await?;
    let size = h.size();
    let sum = checksum::compute(&mut h, &params).await.map_err(|e| {
        log::error!("CHECKSUM error image_id={} err={e}", t.id());
        OpError::from(e)
    })?;
    log.bytes = size;
    Ok(sum)
}

/// Flushes what was written to the transfer's storage (fsync for a file).
pub(crate) async fn flush(t: &Arc<Transfer>) -> Result<(), OpError> {
    let mut h = open(t).await?;
    h.flush().await.map_err(|e| {
        log::error!("FLUSH error err={e}");
        OpError::from(e)
    })
}
