//! A bounds-checked cursor over one message: every read either succeeds or names the field and
//! offset where the bytes ran out, and no read allocates before the bytes it needs are known to exist.

use super::error::DecodeError;

/// Reads big-endian integers and strings from the front of a message.
pub(super) struct Reader<'a> {
    /// The bytes not read yet.
    rest: &'a [u8],
    /// The length of the whole message, so that offsets can be reported.
    len: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the first byte of `data`.
    pub(super) fn new(data: &'a [u8]) -> Self {
        Reader {
            rest: data,
            len: data.len(),
        }
    }

    /// The offset of the next byte to read, from the start of the message.
    pub(super) fn offset(&self) -> usize {
        self.len - self.rest.len()
    }

    /// Whether every byte has been read.
    pub(super) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The error for a field of `needed` bytes that does not fit in what is left.
    fn truncated(&self, expected: &'static str, needed: u64) -> DecodeError {
        DecodeError::Truncated {
            offset: self.offset(),
            expected,
            needed,
            remaining: self.rest.len(),
        }
    }

    /// Takes the next `N` bytes as an array, the building block of the integer reads.
    fn array<const N: usize>(&mut self, expected: &'static str) -> Result<[u8; N], DecodeError> {
        let Some((head, tail)) = self.rest.split_first_chunk::<N>() else {
            return Err(self.truncated(expected, N as u64));
        };
        self.rest = tail;
        Ok(*head)
    }

    /// Reads an `Int8` or `Byte1`.
    pub(super) fn u8(&mut self, expected: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(expected).map(|[b]| b)
    }

    /// Reads an `Int16` that is a count, which Postgres never sends negative.
    pub(super) fn u16(&mut self, expected: &'static str) -> Result<u16, DecodeError> {
        self.array(expected).map(u16::from_be_bytes)
    }

    /// Reads an `Int32` that is an id, an oid or a length.
    pub(super) fn u32(&mut self, expected: &'static str) -> Result<u32, DecodeError> {
        self.array(expected).map(u32::from_be_bytes)
    }

    /// Reads an `Int32` that is signed on the wire, such as a type modifier.
    pub(super) fn i32(&mut self, expected: &'static str) -> Result<i32, DecodeError> {
        self.array(expected).map(i32::from_be_bytes)
    }

    /// Reads an `Int64` that is an LSN.
    pub(super) fn u64(&mut self, expected: &'static str) -> Result<u64, DecodeError> {
        self.array(expected).map(u64::from_be_bytes)
    }

    /// Reads an `Int64` that is signed on the wire, such as a timestamp.
    pub(super) fn i64(&mut self, expected: &'static str) -> Result<i64, DecodeError> {
        self.array(expected).map(i64::from_be_bytes)
    }

    /// Reads a NUL-terminated UTF-8 string and consumes its terminator.
    pub(super) fn cstr(&mut self, expected: &'static str) -> Result<String, DecodeError> {
        let offset = self.offset();
        let Some(nul) = self.rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::Unterminated { offset, expected });
        };
        let Some((text, tail)) = self.rest.split_at_checked(nul) else {
            return Err(DecodeError::Unterminated { offset, expected });
        };
        let text = std::str::from_utf8(text)
            .map_err(|_| DecodeError::InvalidUtf8 { offset, expected })?
            .to_owned();
        // `tail` starts with the NUL that `position` found.
        self.rest = tail.get(1..).unwrap_or_default();
        Ok(text)
    }

    /// Reads an `Int32` length followed by that many bytes, checking the length against what is
    /// left before anything is allocated, so that a hostile length costs nothing.
    pub(super) fn len_prefixed(&mut self, expected: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(expected)?;
        let Some((head, tail)) = usize::try_from(len)
            .ok()
            .and_then(|len| self.rest.split_at_checked(len))
        else {
            return Err(self.truncated(expected, u64::from(len)));
        };
        self.rest = tail;
        Ok(head)
    }

    /// Reads a length-prefixed UTF-8 value.
    pub(super) fn text(&mut self, expected: &'static str) -> Result<String, DecodeError> {
        let offset = self.offset();
        let bytes = self.len_prefixed(expected)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { offset, expected })
    }

    /// Checks that `count` items of at least `min_size` bytes each can still follow, so that a
    /// `Vec::with_capacity(count)` cannot be inflated by a hostile count.
    pub(super) fn check_count(
        &self,
        count: usize,
        min_size: usize,
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        let needed = count.saturating_mul(min_size);
        if needed > self.rest.len() {
            return Err(self.truncated(expected, needed as u64));
        }
        Ok(())
    }

    /// Ends the message: any byte left over is an error, because it means we misread the format.
    pub(super) fn finish(self, message: &'static str) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                offset: self.offset(),
                count: self.rest.len(),
                message,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_big_endian_and_advance_the_offset() {
        let data = [1, 0, 2, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xfe];
        let mut r = Reader::new(&data);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.u16("b"), Ok(2));
        assert_eq!(r.u32("c"), Ok(3));
        assert_eq!(r.offset(), 7);
        assert_eq!(r.i32("d"), Ok(-2));
        assert_eq!(r.finish("test"), Ok(()));
    }

    #[test]
    fn a_short_read_names_the_field_and_offset() {
        let mut r = Reader::new(&[0, 0, 0]);
        assert_eq!(
            r.u64("final LSN"),
            Err(DecodeError::Truncated {
                offset: 0,
                expected: "final LSN",
                needed: 8,
                remaining: 3
            })
        );
    }

    #[test]
    fn a_string_needs_its_nul() {
        let mut r = Reader::new(b"ab\0cd");
        assert_eq!(r.cstr("x").as_deref(), Ok("ab"));
        assert_eq!(
            r.cstr("y"),
            Err(DecodeError::Unterminated {
                offset: 3,
                expected: "y"
            })
        );
    }

    #[test]
    fn a_hostile_length_is_refused_before_allocating() {
        let mut r = Reader::new(&[0x7f, 0xff, 0xff, 0xff, b'x']);
        assert_eq!(
            r.text("column value"),
            Err(DecodeError::Truncated {
                offset: 4,
                expected: "column value",
                needed: 0x7fff_ffff,
                remaining: 1
            })
        );
        let r = Reader::new(&[0; 3]);
        assert!(r.check_count(usize::MAX, 4, "relation ids").is_err());
        assert!(r.check_count(3, 1, "columns").is_ok());
    }

    #[test]
    fn leftover_bytes_are_reported() {
        let mut r = Reader::new(&[1, 2, 3]);
        r.u8("a").ok();
        assert_eq!(
            r.finish("begin"),
            Err(DecodeError::TrailingBytes {
                offset: 1,
                count: 2,
                message: "begin"
            })
        );
    }
}
