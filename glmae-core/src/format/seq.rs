//! A postcard sequence kept as bytes and decoded lazily, so a reader needs no allocator.

use core::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error as _};
use serde::{Serialize, Serializer};

/// A sequence of `T`, stored as a postcard byte string holding `varint(count)` then the items.
/// Decoding checks every item once; iterating afterwards cannot fail.
pub struct Seq<'a, T> {
    count: usize,
    items: &'a [u8],
    encoded: &'a [u8],
    _item: PhantomData<fn() -> T>,
}

impl<T> Clone for Seq<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Seq<'_, T> {}

impl<T> core::fmt::Debug for Seq<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Seq({} items, {} bytes)", self.count, self.encoded.len())
    }
}

impl<'a, T: Deserialize<'a>> Seq<'a, T> {
    /// Checks and wraps `encoded`; `None` if any item is malformed or bytes are left over.
    pub fn decode(encoded: &'a [u8]) -> Option<Self> {
        let (count, items) = postcard::take_from_bytes::<u32>(encoded).ok()?;
        let mut rest = items;
        for _ in 0..count {
            rest = postcard::take_from_bytes::<T>(rest).ok()?.1;
        }
        if !rest.is_empty() {
            return None;
        }
        Some(Self { count: count as usize, items, encoded, _item: PhantomData })
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The items, decoded one at a time.
    pub fn iter(&self) -> SeqIter<'a, T> {
        SeqIter { rest: self.items, remaining: self.count, _item: PhantomData }
    }

    /// The item at `index`, decoding those before it.
    pub fn get(&self, index: usize) -> Option<T> {
        self.iter().nth(index)
    }

    /// The encoded bytes (`varint(count)` then the items).
    pub fn encoded(&self) -> &'a [u8] {
        self.encoded
    }
}

/// Iterator over a [`Seq`].
pub struct SeqIter<'a, T> {
    rest: &'a [u8],
    remaining: usize,
    _item: PhantomData<fn() -> T>,
}

impl<'a, T: Deserialize<'a>> Iterator for SeqIter<'a, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        if self.remaining == 0 {
            return None;
        }
        // Cannot fail: `Seq::decode` decoded these very bytes.
        let (item, rest) = postcard::take_from_bytes::<T>(self.rest).ok()?;
        self.rest = rest;
        self.remaining -= 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<'de: 'a, 'a, T: Deserialize<'a>> Deserialize<'de> for Seq<'a, T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = <&'de [u8]>::deserialize(d)?;
        Seq::decode(bytes).ok_or_else(|| D::Error::custom("malformed sequence"))
    }
}

impl<T> Serialize for Seq<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.encoded)
    }
}

/// Encodes `items` as the bytes a [`Seq`] wraps.
#[cfg(feature = "alloc")]
pub fn encode<T: Serialize>(items: &[T]) -> Result<alloc::vec::Vec<u8>, postcard::Error> {
    let mut out = postcard::to_allocvec(&(items.len() as u32))?;
    for item in items {
        out.extend_from_slice(&postcard::to_allocvec(item)?);
    }
    Ok(out)
}
