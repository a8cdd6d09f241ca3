-- Replica identity for the tables that rules/ reads.
--
-- With the default replica identity, the WAL (and so pgoutput) carries no old row for an UPDATE
-- unless the primary key changed, and only the primary key for a DELETE. A rule whose key
-- template needs any other column of the old row (a booking's car_id, a car's location_id) then
-- cannot render it: invalidator turns that placeholder into `*` and deletes every matching key
-- (over-invalidation; `invalidator check` reports each such rule). With REPLICA IDENTITY FULL,
-- every UPDATE and DELETE carries the whole old row, so keys are rendered exactly from the old
-- and the new values, and a row that moves (a booking to another car, a car to another
-- location) invalidates both sides.
--
-- The price is WAL volume: the old row is logged with each UPDATE and DELETE. Every table here
-- has small rows (no large bodies or blobs; email bodies stay at Resend), and the busiest by
-- writes (booking_events) is append-only, so the cost is small. Every table the rules name
-- needs a non-key column of the old row, so all of them are FULL; a table that rules reference
-- only through its primary key could keep DEFAULT.
--
-- ALTER TABLE ... REPLICA IDENTITY is idempotent.

-- customers: session:{user_id} needs the old user_id when a guest customer is linked to an
-- account (user_id changes) or a customer is deleted.
ALTER TABLE customers REPLICA IDENTITY FULL;

-- cars: cars:available:{location_id} needs the old location_id, so a car moved to another
-- location leaves the old location's list as well as entering the new one; `changed` on
-- make/model/year/image_url compares old and new values.
ALTER TABLE cars REPLICA IDENTITY FULL;

-- car_features: every key is rendered from car_id (car:{car_id}); a deleted feature row would
-- otherwise carry only its own id.
ALTER TABLE car_features REPLICA IDENTITY FULL;

-- bookings: a booking moved to another car must invalidate the old car's availability
-- (availability:{car_id}:*), a reassigned booking the old customer's history
-- (customer:{customer_id}:bookings); `changed` (car_id, start_date, end_date, overall_status,
-- ...) must compare old and new values to skip unrelated updates.
ALTER TABLE bookings REPLICA IDENTITY FULL;

-- car_availability: availability:{car_id}:* and availability:{date}:* need the old car_id and
-- date on updates and deletes; `changed` (status, date, car_id) compares old and new.
ALTER TABLE car_availability REPLICA IDENTITY FULL;

-- booking_events: booking:{booking_id}:* needs booking_id when events are deleted (cascading
-- from a booking delete) or corrected. Append-only, so FULL costs almost nothing.
ALTER TABLE booking_events REPLICA IDENTITY FULL;

-- car_reviews: car:{car_id}:* keys need the old car_id when a review is deleted (moderation) or
-- edited; `changed` (rating, is_approved, car_id) compares old and new.
ALTER TABLE car_reviews REPLICA IDENTITY FULL;

-- paypal_invoices: booking:{booking_id} needs booking_id on webhook status updates and
-- deletes of drafts; `changed` (status, amount, ...) compares old and new for the dashboard.
ALTER TABLE paypal_invoices REPLICA IDENTITY FULL;

-- booking_secure_tokens: booking_token:{token_hash} needs the old token_hash when a link is
-- rotated or revoked, so the old token's cached lookup is deleted too.
ALTER TABLE booking_secure_tokens REPLICA IDENTITY FULL;

-- inbox_emails: booking:{booking_id}:emails needs booking_id on the webhook updates (delivered,
-- opened, ...) and when a booking delete sets booking_id to NULL (the old booking's list).
ALTER TABLE inbox_emails REPLICA IDENTITY FULL;
