//! Checks of a Parquet file's own structures before the parquet crate decodes them, for the sizes it trusts.
//!
//! The crate's Thrift skipper takes a boolean inside a list or map as 0 bytes (the compact protocol spends one), so
//! a header of a few bytes claiming 2^31 of them spins for seconds, and a file of many such headers for hours; and
//! the record reader allocates a dictionary page's claimed value count before decoding it. Both were found by
//! fuzzing (docs/RELIABILITY.md). This module walks the footer and every page header with a small reader of the
//! compact protocol of its own (the crate's is private) that refuses a count larger than the bytes left, since
//! every element of a list, set or map takes at least one byte.
//!
//! The crate reads a field it knows by the type its schema declares, whatever type the file gives it, and skips
//! only the others by their given type. A page header is small, so its walk here reads the fields the crate knows
//! as the crate does and sees the same skips. The footer's schema is some twenty structs read partly by hand, so
//! its walk here is untyped and can miss a skip the crate takes: the crate decodes the footer on a thread of its
//! own, and a footer that takes far longer than its size warrants is an error (`open`).

use anyhow::{bail, Context, Result};
use parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use std::time::Duration;

/// Structs nest this deep at most (the crate allows 64 in its skipper too).
const MAX_DEPTH: u32 = 64;

/// Opens the Parquet file `bytes` (read through `reader`): checks its footer, then lets the parquet crate decode it
/// within a deadline of 2 s plus 1 s per MB of footer (a sound footer decodes at hundreds of MB/s). Past the
/// deadline the decoding thread is left to spin and the file is an error; the caller stops on it.
pub fn open<R: ChunkReader + 'static>(reader: R, bytes: &[u8]) -> Result<SerializedFileReader<R>> {
    check_footer(bytes)?;
    let footer_len = bytes
        .len()
        .checked_sub(8)
        .map_or(0, |at| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize);
    let deadline = Duration::from_secs(2) + Duration::from_secs_f64(footer_len as f64 / 1e6);
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("parquet-footer".into())
        .spawn(move || {
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| SerializedFileReader::new(reader)))
                .map_err(|panic| anyhow::anyhow!("the Parquet reader failed ({})", panic_message(&panic)))
                .and_then(|opened| opened.map_err(anyhow::Error::from));
            let _ = send.send(opened);
        })
        .context("cannot start a thread to read the footer")?;
    match receive.recv_timeout(deadline) {
        Ok(opened) => opened,
        Err(_) => bail!(
            "its footer ({footer_len} bytes) takes more than {} s to decode; is the file corrupt?",
            deadline.as_secs()
        ),
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}

/// Checks the footer (the Thrift `FileMetaData` before the last 8 bytes) of the Parquet file `bytes`. A file
/// too short or without the `PAR1` magic is left to the parquet crate, which reports it.
fn check_footer(bytes: &[u8]) -> Result<()> {
    let Some(tail) = bytes.len().checked_sub(8).map(|at| &bytes[at..]) else { return Ok(()) };
    if &tail[4..] != b"PAR1" {
        return Ok(());
    }
    let length = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as usize;
    let Some(start) = (bytes.len() - 8).checked_sub(length) else { return Ok(()) };
    let mut footer = Compact { buf: &bytes[start..bytes.len() - 8], pos: 0 };
    footer.skip_struct(MAX_DEPTH).map_err(|e| anyhow::anyhow!("its footer is corrupt: {e}"))
}

/// Checks every page header of every column chunk, and that no dictionary page claims more values than its bytes
/// hold (a value takes at least one bit, as booleans do, so `8 * bytes` bounds every type).
pub fn check_pages<R: ChunkReader + 'static>(reader: &SerializedFileReader<R>, bytes: &[u8]) -> Result<()> {
    use parquet::column::page::Page;
    for group in 0..reader.num_row_groups() {
        let group_reader = reader.get_row_group(group)?;
        for column in 0..group_reader.num_columns() {
            let chunk = group_reader.metadata().column(column);
            let name = || format!("column `{}` (row group {group})", chunk.column_path().string());
            let (start, length) = chunk.byte_range();
            let end = start.saturating_add(length).min(bytes.len() as u64) as usize;
            let mut at = (start as usize).min(end);
            while at < end {
                let mut header = Compact { buf: &bytes[at..end], pos: 0 };
                let body = header.page_header().map_err(|e| anyhow::anyhow!("{}: corrupt page header: {e}", name()))?;
                at = at.saturating_add(header.pos).saturating_add(body);
            }
            // The record reader takes a dictionary page wherever it stands, so every page is looked at.
            let mut pages = group_reader.get_column_page_reader(column)?;
            while let Some(page) = pages.peek_next_page()? {
                if !page.is_dict {
                    pages.skip_next_page()?;
                    continue;
                }
                let Some(Page::DictionaryPage { buf, num_values, .. }) = pages.get_next_page()? else { continue };
                if num_values as usize > buf.len().saturating_mul(8) {
                    bail!(
                        "{} claims {num_values} dictionary values in {} bytes; is the file corrupt?",
                        name(),
                        buf.len()
                    );
                }
            }
        }
    }
    Ok(())
}

/// A reader of the Thrift compact protocol that only skips, checking each size against the bytes left.
struct Compact<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Compact<'_> {
    fn byte(&mut self) -> Result<u8> {
        let Some(&b) = self.buf.get(self.pos) else { bail!("it ends inside a value") };
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift.min(63);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("a variable-length integer runs past 10 bytes")
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            bail!("a value claims {n} bytes where {left} are left");
        }
        self.pos += n as usize;
        Ok(())
    }

    /// A count of `n` elements of a list, set or map, each at least one byte.
    fn count(&mut self, n: u64) -> Result<u64> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            bail!("a list claims {n} elements where {left} bytes are left");
        }
        Ok(n)
    }

    /// Skips a value of compact type `ty`; `in_collection`: an element of a list, set or map, where a boolean
    /// takes a byte (in a struct field it is the field's type).
    fn skip_value(&mut self, ty: u8, depth: u32, in_collection: bool) -> Result<()> {
        match ty {
            1 | 2 if in_collection => self.skip(1),
            1 | 2 => Ok(()),
            3 => self.skip(1),
            4..=6 => self.varint().map(drop),
            7 => self.skip(8),
            8 => {
                let n = self.varint()?;
                self.skip(n)
            }
            9 | 10 => {
                let header = self.byte()?;
                let short = u64::from(header >> 4);
                let n = if short == 15 { self.varint()? } else { short };
                for _ in 0..self.count(n)? {
                    self.skip_value(header & 0x0f, self.deeper(depth)?, true)?;
                }
                Ok(())
            }
            11 => {
                let n = self.varint()?;
                if n > 0 {
                    let types = self.byte()?;
                    for _ in 0..self.count(n)? {
                        self.skip_value(types >> 4, self.deeper(depth)?, true)?;
                        self.skip_value(types & 0x0f, self.deeper(depth)?, true)?;
                    }
                }
                Ok(())
            }
            12 => self.skip_struct(self.deeper(depth)?),
            13 => self.skip(16),
            other => bail!("unknown Thrift type {other}"),
        }
    }

    fn deeper(&self, depth: u32) -> Result<u32> {
        depth.checked_sub(1).filter(|&d| d > 0).ok_or_else(|| anyhow::anyhow!("values nest too deep"))
    }

    /// Skips a struct's fields up to its stop byte (the crate stops at any type 0, whatever the delta).
    fn skip_struct(&mut self, depth: u32) -> Result<()> {
        loop {
            let header = self.byte()?;
            let (delta, ty) = (header >> 4, header & 0x0f);
            if ty == 0 {
                return Ok(());
            }
            if delta == 0 {
                self.varint()?; // the field id in full
            }
            self.skip_value(ty, depth, false)?;
        }
    }

    /// Skips a `PageHeader` and returns the size of the page body after it (field 3, `compressed_page_size`),
    /// reading the fields the crate knows by their declared types, as the crate does.
    fn page_header(&mut self) -> Result<usize> {
        let mut body = None;
        self.typed_struct(PAGE_HEADER, MAX_DEPTH, &mut |id, value| {
            if id == 3 {
                body = Some(value);
            }
        })?;
        let body = body.ok_or_else(|| anyhow::anyhow!("no compressed_page_size"))?;
        usize::try_from(body).map_err(|_| anyhow::anyhow!("a negative page size"))
    }

    /// Skips a struct whose known fields are `fields`, reading those by their declared type whatever type the
    /// file gives them; `integer(id, value)` sees each integer field.
    fn typed_struct(
        &mut self,
        fields: &[(i64, Declared)],
        depth: u32,
        integer: &mut dyn FnMut(i64, i64),
    ) -> Result<()> {
        let mut id = 0i64;
        loop {
            let header = self.byte()?;
            let (delta, ty) = (header >> 4, header & 0x0f);
            if ty == 0 {
                return Ok(());
            }
            id = if delta == 0 { zigzag(self.varint()?) } else { id + i64::from(delta) };
            match fields.iter().find(|(known, _)| *known == id).map(|&(_, declared)| declared) {
                Some(Declared::Integer) => integer(id, zigzag(self.varint()?)),
                // A boolean field's value is its type; the crate refuses a boolean field of another type.
                Some(Declared::Boolean) if matches!(ty, 1 | 2) => {}
                Some(Declared::Boolean) => bail!("field {id} should be a boolean"),
                Some(Declared::Struct(inner)) => self.typed_struct(inner, self.deeper(depth)?, &mut |_, _| {})?,
                None => self.skip_value(ty, depth, false)?,
            }
        }
    }
}

/// The type parquet.thrift declares for a field the crate reads.
#[derive(Clone, Copy)]
enum Declared {
    /// i32 and the enums (a zigzag varint)
    Integer,
    Boolean,
    Struct(&'static [(i64, Declared)]),
}

/// `PageHeader` as the crate reads it by default (page statistics, fields 5 and 8 of the data page headers, are
/// skipped by their given type). Fields 1-4: type, sizes, crc; 5-8: the headers of each kind of page.
const PAGE_HEADER: &[(i64, Declared)] = {
    use Declared::*;
    const DATA_PAGE: &[(i64, Declared)] = &[(1, Integer), (2, Integer), (3, Integer), (4, Integer)];
    const DICTIONARY_PAGE: &[(i64, Declared)] = &[(1, Integer), (2, Integer), (3, Boolean)];
    const DATA_PAGE_V2: &[(i64, Declared)] =
        &[(1, Integer), (2, Integer), (3, Integer), (4, Integer), (5, Integer), (6, Integer), (7, Boolean)];
    &[
        (1, Integer),
        (2, Integer),
        (3, Integer),
        (4, Integer),
        (5, Struct(DATA_PAGE)),
        (6, Struct(&[])),
        (7, Struct(DICTIONARY_PAGE)),
        (8, Struct(DATA_PAGE_V2)),
    ]
};

fn zigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_claiming_more_elements_than_bytes_is_refused_and_booleans_in_lists_take_a_byte() {
        // struct { 1: list<bool> [true, false] } then stop
        let ok = [0x19, 0x21, 0x01, 0x02, 0x00];
        Compact { buf: &ok, pos: 0 }.skip_struct(MAX_DEPTH).unwrap();
        // the same list claiming 2^31 - 1 booleans in 4 bytes
        let claim = [0x19, 0xf1, 0xff, 0xff, 0xff, 0xff, 0x07, 0x00];
        let error = Compact { buf: &claim, pos: 0 }.skip_struct(MAX_DEPTH).unwrap_err();
        assert!(error.to_string().contains("claims 2147483647 elements"), "{error}");
        // a map<bool, bool> of 2^31 - 1 entries
        let map = [0x1b, 0xff, 0xff, 0xff, 0xff, 0x07, 0x11, 0x00];
        assert!(Compact { buf: &map, pos: 0 }.skip_struct(MAX_DEPTH).is_err());
    }

    #[test]
    fn a_page_header_gives_its_body_size() {
        // PageHeader { 1: type = 0, 2: uncompressed_page_size = 5, 3: compressed_page_size = 3 }
        let header = [0x15, 0x00, 0x15, 0x0a, 0x15, 0x06, 0x00];
        assert_eq!(Compact { buf: &header, pos: 0 }.page_header().unwrap(), 3);
    }

    #[test]
    fn a_page_header_is_walked_as_the_crate_reads_it_by_declared_types() {
        // Field 5 (the data page header, a struct) given as a 21-byte binary: an untyped walk skips the bytes,
        // the crate reads them as a struct whose unknown field 6 is a list of 2^24 - 1 booleans.
        let mut header = vec![0x15, 0x00, 0x15, 0x0a, 0x15, 0x06, 0x28, 0x15];
        header.extend([0x00, 0x59, 0xf1, 0xff, 0xff, 0xff, 0x07, 0x00]);
        header.extend([0x00; 14]);
        assert!(Compact { buf: &header, pos: 0 }.skip_struct(MAX_DEPTH).is_ok());
        let error = Compact { buf: &header, pos: 0 }.page_header().unwrap_err();
        assert!(error.to_string().contains("claims 16777215 elements"), "{error}");
    }
}
