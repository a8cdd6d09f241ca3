-- The plan's indexes ("current" and "missing"), as plain CREATE INDEX so the file can run in a
-- transaction; on a large live table, create them CONCURRENTLY by hand instead.
--
-- Left out on purpose: a plain index whose columns are the leading columns of another index
-- here or of a unique constraint (bookings(customer_id), bookings(car_id),
-- car_availability(car_id), inbox_emails(booking_id)); the wider index serves the same lookups
-- and the foreign keys. Unique columns (customers.user_id, customers.email,
-- inbox_emails.resend_email_id, ...) are indexed by their constraints in 0002.

-- bookings ---------------------------------------------------------------------------------

-- Customer booking history: WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 20.
CREATE INDEX IF NOT EXISTS idx_bookings_customer_history
    ON bookings (customer_id, created_at DESC)
    INCLUDE (car_id, overall_status, total_amount);

-- Availability overlap checks for one car.
CREATE INDEX IF NOT EXISTS idx_bookings_car_dates
    ON bookings (car_id, start_date, end_date);

-- Active bookings by date (admin lists, bookings:active:{date}).
CREATE INDEX IF NOT EXISTS idx_bookings_active
    ON bookings (overall_status, start_date, end_date)
    WHERE overall_status IN ('confirmed', 'in_progress');

-- cars -------------------------------------------------------------------------------------

CREATE INDEX IF NOT EXISTS idx_cars_is_available
    ON cars (is_available);

-- Available cars by location, best rated first (cars:available:{location_id}).
CREATE INDEX IF NOT EXISTS idx_cars_search
    ON cars (is_available, location_id, average_rating DESC)
    WHERE is_available = true;

CREATE INDEX IF NOT EXISTS idx_cars_make_model
    ON cars (make, model);

-- Feature filter without the car_features join: features_array @> ARRAY['GPS', 'Bluetooth'].
CREATE INDEX IF NOT EXISTS idx_cars_features
    ON cars USING gin (features_array);

-- car_features -----------------------------------------------------------------------------

-- The join-based feature filter (cf.name IN (...)); (car_id, name) is the unique constraint.
CREATE INDEX IF NOT EXISTS idx_car_features_name
    ON car_features (name);

-- car_availability -------------------------------------------------------------------------

-- The critical availability lookup: car_id = $1 AND date BETWEEN $2 AND $3 AND status = 'available'.
CREATE INDEX IF NOT EXISTS idx_car_availability_lookup
    ON car_availability (car_id, date, status)
    WHERE status = 'available';

CREATE INDEX IF NOT EXISTS idx_car_availability_date
    ON car_availability (date);

-- For ON DELETE SET NULL from bookings.
CREATE INDEX IF NOT EXISTS idx_car_availability_booking_id
    ON car_availability (booking_id)
    WHERE booking_id IS NOT NULL;

-- booking_events ---------------------------------------------------------------------------

CREATE INDEX IF NOT EXISTS idx_booking_events_booking_timestamp
    ON booking_events (booking_id, "timestamp" DESC);

CREATE INDEX IF NOT EXISTS idx_booking_events_event_type
    ON booking_events (event_type);

CREATE INDEX IF NOT EXISTS idx_booking_events_timestamp
    ON booking_events ("timestamp");

CREATE INDEX IF NOT EXISTS idx_booking_events_payment_cancel
    ON booking_events (event_type)
    WHERE event_type IN ('payment_received', 'cancelled');

-- car_reviews ------------------------------------------------------------------------------

CREATE INDEX IF NOT EXISTS idx_car_reviews_car_id
    ON car_reviews (car_id);

CREATE INDEX IF NOT EXISTS idx_car_reviews_customer_id
    ON car_reviews (customer_id);

-- A car's public reviews, newest first (the plan's partial index on is_approved, made useful
-- for that query by leading with car_id).
CREATE INDEX IF NOT EXISTS idx_car_reviews_approved
    ON car_reviews (car_id, created_at DESC)
    WHERE is_approved = true;

-- paypal_invoices --------------------------------------------------------------------------

CREATE INDEX IF NOT EXISTS idx_paypal_invoices_booking_id
    ON paypal_invoices (booking_id);

CREATE INDEX IF NOT EXISTS idx_paypal_invoices_status
    ON paypal_invoices (status);

-- booking_secure_tokens --------------------------------------------------------------------

-- Expiry sweeps.
CREATE INDEX IF NOT EXISTS idx_booking_secure_tokens_expires_at
    ON booking_secure_tokens (expires_at);

-- inbox_emails -----------------------------------------------------------------------------

-- A booking's email history, newest first.
CREATE INDEX IF NOT EXISTS idx_inbox_emails_booking_history
    ON inbox_emails (booking_id, created_at DESC);

CREATE INDEX IF NOT EXISTS idx_inbox_emails_recipient_email
    ON inbox_emails (recipient_email);

-- Tag filters: tags @> '["contract"]'.
CREATE INDEX IF NOT EXISTS idx_inbox_emails_tags
    ON inbox_emails USING gin (tags);
