//! A checked byte cursor: the one way ferry reads fixed-width fields off a byte slice.
//!
//! Every decoder of untrusted or possibly torn bytes (journal record bodies, tracker files, NBD
//! option data, block-stream frame metas) reads through [`Reader`], so none of them indexes or
//! splits a slice by hand.
//!
//! [`truncate_utf8`] is the writer side's one helper: it cuts a string to a bounded field.
//!
//! Invariants:
//! - No method panics, whatever the input: running out of bytes is a [`CodecError`], and a
//!   failed read consumes nothing.
//! - Pure: no I/O, no allocation, no imports from the rest of the crate (bottom layer).
//! - Callers choose the byte order per field (`_be` for the network protocols, `_le` for the
//!   on-disk formats) and map [`CodecError`] into their own error type.

use thiserror::Error;

/// A read past the end of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The field needs more bytes than are left.
    #[error("{needed_bytes} bytes needed, {left_bytes} left")]
    Truncated {
        /// Bytes the field needs.
        needed_bytes: usize,
        /// Bytes that were left.
        left_bytes: usize,
    },
}

/// Takes fields off the front of a byte slice; see the module docs.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next `len` bytes.
    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        if len > self.rest.len() {
            return Err(CodecError::Truncated {
                needed_bytes: len,
                left_bytes: self.rest.len(),
            });
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(head)
    }

    /// The next `N` bytes, by value.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.bytes(N)?);
        Ok(array)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, CodecError> {
        self.array::<1>().map(|[byte]| byte)
    }

    /// A big-endian `u16`.
    pub fn u16_be(&mut self) -> Result<u16, CodecError> {
        self.array().map(u16::from_be_bytes)
    }

    /// A big-endian `u32`.
    pub fn u32_be(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_be_bytes)
    }

    /// A big-endian `u64`.
    pub fn u64_be(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A little-endian `u32`.
    pub fn u32_le(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_le_bytes)
    }

    /// A little-endian `u64`.
    pub fn u64_le(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_le_bytes)
    }
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on a character
/// boundary: how a string is cut to fit a bounded field before it is written.
pub fn truncate_utf8(text: &str, max_bytes: usize) -> &str {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_in_order_with_their_byte_order() {
        // Goal: each width and byte order decodes what `to_*_bytes` wrote, in order, and the
        // cursor ends empty. Method: encode one field of each kind back to back, read them.
        let mut bytes = vec![0xAB];
        bytes.extend_from_slice(&0x0102u16.to_be_bytes());
        bytes.extend_from_slice(&0x0304_0506u32.to_be_bytes());
        bytes.extend_from_slice(&0x0708_090a_0b0c_0d0eu64.to_be_bytes());
        bytes.extend_from_slice(&0x1112_1314u32.to_le_bytes());
        bytes.extend_from_slice(&0x1516_1718_191a_1b1cu64.to_le_bytes());
        bytes.extend_from_slice(b"tail");
        let mut reader = Reader::new(&bytes);
        assert_eq!(reader.remaining(), bytes.len());
        assert_eq!(reader.u8(), Ok(0xAB));
        assert_eq!(reader.u16_be(), Ok(0x0102));
        assert_eq!(reader.u32_be(), Ok(0x0304_0506));
        assert_eq!(reader.u64_be(), Ok(0x0708_090a_0b0c_0d0e));
        assert_eq!(reader.u32_le(), Ok(0x1112_1314));
        assert_eq!(reader.u64_le(), Ok(0x1516_1718_191a_1b1c));
        assert!(!reader.is_empty());
        assert_eq!(reader.array::<2>(), Ok(*b"ta"));
        assert_eq!(reader.bytes(2), Ok(&b"il"[..]));
        assert!(reader.is_empty());
        assert_eq!(reader.bytes(0), Ok(&[][..]));
    }

    #[test]
    fn short_input_is_an_error_that_consumes_nothing() {
        // Goal: a read past the end names what was needed and what was left, and leaves the
        // cursor where it was. Method: every read on 3 bytes, then the bytes are still there.
        let mut reader = Reader::new(&[1, 2, 3]);
        let truncated = |needed_bytes| {
            Some(CodecError::Truncated {
                needed_bytes,
                left_bytes: 3,
            })
        };
        assert_eq!(reader.u32_be().err(), truncated(4));
        assert_eq!(reader.u32_le().err(), truncated(4));
        assert_eq!(reader.u64_be().err(), truncated(8));
        assert_eq!(reader.u64_le().err(), truncated(8));
        assert_eq!(reader.array::<4>().err(), truncated(4));
        assert_eq!(reader.bytes(usize::MAX).err(), truncated(usize::MAX));
        assert_eq!(reader.remaining(), 3);
        assert_eq!(
            CodecError::Truncated {
                needed_bytes: 8,
                left_bytes: 3
            }
            .to_string(),
            "8 bytes needed, 3 left"
        );
        assert_eq!(reader.u16_be(), Ok(0x0102));
        assert_eq!(reader.u8(), Ok(3));
        assert_eq!(
            reader.u8(),
            Err(CodecError::Truncated {
                needed_bytes: 1,
                left_bytes: 0
            })
        );
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        // Goal: a cut never splits a character and never exceeds the bound. Method: cut a
        // string of 1-, 2- and 3-byte characters at every length.
        let text = "aé€b";
        let expected = ["", "a", "a", "aé", "aé", "aé", "aé€", "aé€b", "aé€b"];
        for (max_bytes, want) in expected.iter().enumerate() {
            assert_eq!(truncate_utf8(text, max_bytes), *want, "{max_bytes}");
        }
    }

    #[test]
    fn random_reads_never_panic_and_account_for_every_byte() {
        // Goal: no sequence of reads panics, and bytes read plus bytes left is always the
        // input length. Method: pseudo-random inputs and read sequences (xorshift, so this
        // bottom module needs nothing from the crate).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % bound).expect("small bound")
        };
        for _ in 0..2_000 {
            let input: Vec<u8> = (0..next(40)).map(|_| next(256) as u8).collect();
            let mut reader = Reader::new(&input);
            let mut read = 0;
            for _ in 0..next(12) {
                let width = match next(7) {
                    0 => reader.u8().map(|_| 1),
                    1 => reader.u16_be().map(|_| 2),
                    2 => reader.u32_be().map(|_| 4),
                    3 => reader.u64_be().map(|_| 8),
                    4 => reader.u32_le().map(|_| 4),
                    5 => reader.u64_le().map(|_| 8),
                    _ => {
                        let len = next(20);
                        reader.bytes(len).map(<[u8]>::len)
                    }
                };
                read += width.unwrap_or(0);
                assert_eq!(read + reader.remaining(), input.len());
            }
        }
    }
}
