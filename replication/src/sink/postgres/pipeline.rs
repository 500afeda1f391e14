//! The pipelined session: requests sent together and answered in order
//! (one round trip for a batch), and the `text[]` parameter that carries
//! one column of many rows. Pure apart from the futures it is given.

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::types::ArrayDimension;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::change::Datum;

/// One column of a set-based statement: the values of many rows, sent as
/// a single `text[]` parameter and cast to the column's type by the
/// statement. Written straight from the decoded values into the array's
/// binary form: no per-value allocation, and bytes that are not valid in
/// the target's encoding are refused by the server instead of being
/// replaced on the way.
#[derive(Debug)]
pub(super) struct TextColumn<'a>(pub(super) Vec<Option<&'a [u8]>>);

impl ToSql for TextColumn<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let dimension = ArrayDimension {
            len: i32::try_from(self.0.len())?,
            lower_bound: 1,
        };
        postgres_protocol::types::array_to_sql(
            Some(dimension),
            Type::TEXT.oid(),
            self.0.iter(),
            |value, buf| match value {
                Some(bytes) => {
                    buf.put_slice(bytes);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

/// The bytes of a value, `None` for NULL and unchanged TOAST.
pub(super) fn datum_bytes(datum: &Datum) -> Option<&Bytes> {
    match datum {
        Datum::Text(bytes) | Datum::Binary(bytes) => Some(bytes),
        Datum::Null | Datum::UnchangedToast => None,
    }
}

/// The columns `columns` of `rows`, one [`TextColumn`] each.
pub(super) fn text_columns<'a>(
    rows: &[&'a [Datum]],
    columns: impl IntoIterator<Item = usize>,
) -> Vec<TextColumn<'a>> {
    columns
        .into_iter()
        .map(|i| {
            TextColumn(
                rows.iter()
                    .map(|r| r.get(i).and_then(datum_bytes).map(|b| &b[..]))
                    .collect(),
            )
        })
        .collect()
}

/// The answer to one request of a pipeline.
pub(super) enum Reply {
    Done,
    Count(u64),
    Row(tokio_postgres::Row),
}

/// A request of a pipeline.
pub(super) type Request<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Reply, tokio_postgres::Error>> + Send + 'a>,
>;

/// Runs `requests` as one pipeline and returns their results in order.
///
/// tokio-postgres sends a request when its future is first polled and
/// answers requests in the order sent; this polls every future in order,
/// so the server receives them in that order (`join_all` does not
/// promise an order when there are many).
pub(super) async fn in_order<T>(
    mut requests: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>,
) -> Vec<T> {
    let mut results: Vec<Option<T>> = requests.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (request, result) in requests.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match request.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *result = Some(value),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use fallible_iterator::FallibleIterator;

    use super::*;

    #[tokio::test]
    async fn requests_are_sent_in_order_and_answered_in_order() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let mut requests: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>>> =
            Vec::new();
        for i in 0..4usize {
            let sent = Arc::clone(&sent);
            requests.push(Box::pin(async move {
                sent.lock().unwrap().push(i);
                // The first request takes longest to answer.
                for _ in 0..(4 - i) {
                    tokio::task::yield_now().await;
                }
                i * 10
            }));
        }
        assert_eq!(in_order(requests).await, [0, 10, 20, 30]);
        assert_eq!(*sent.lock().unwrap(), [0, 1, 2, 3]);
    }

    #[test]
    fn a_text_column_is_one_text_array_with_nulls() {
        let values: Vec<Option<&[u8]>> = vec![Some(b"a"), None, Some("é'\"".as_bytes())];
        let column = TextColumn(values.clone());
        let mut out = BytesMut::new();
        assert!(matches!(
            column.to_sql(&Type::TEXT_ARRAY, &mut out).unwrap(),
            IsNull::No
        ));
        let array = postgres_protocol::types::array_from_sql(&out).unwrap();
        assert_eq!(array.element_type(), Type::TEXT.oid());
        let decoded: Vec<Option<Vec<u8>>> = array
            .values()
            .map(|v| Ok(v.map(<[u8]>::to_vec)))
            .collect()
            .unwrap();
        let expected: Vec<Option<Vec<u8>>> = values.iter().map(|v| v.map(<[u8]>::to_vec)).collect();
        assert_eq!(decoded, expected);
        assert!(TextColumn::accepts(&Type::TEXT_ARRAY));
        assert!(!TextColumn::accepts(&Type::TEXT));
    }

    #[test]
    fn text_columns_take_the_chosen_columns_and_skip_unchanged_values() {
        let rows: Vec<Vec<Datum>> = vec![
            vec![Datum::Text(Bytes::from_static(b"1")), Datum::Null],
            vec![Datum::Text(Bytes::from_static(b"2")), Datum::UnchangedToast],
        ];
        let slices: Vec<&[Datum]> = rows.iter().map(|r| &r[..]).collect();
        let columns = text_columns(&slices, [1, 0]);
        assert_eq!(columns.len(), 2);
        assert_eq!(columns[0].0, [None, None]);
        assert_eq!(columns[1].0, [Some(&b"1"[..]), Some(&b"2"[..])]);
    }
}
