-- ExoDrive example schema, for invalidator's quick start and tests.
--
-- This is the schema of ExoDrive's database plan (a car-rental platform: customers rent cars;
-- bookings carry payments, contracts, a timeline, emails and reviews), written for stock
-- PostgreSQL 13 or newer with no extensions: gen_random_uuid() is built in, and there is no
-- Supabase `auth` schema, so customers.user_id is a plain uuid rather than a foreign key to
-- auth.users.
--
-- The files are plain SQL, applied in name order, each once:
--   0001_enums.sql             enum types
--   0002_tables.sql            tables, primary keys, foreign keys, audit fields
--   0003_indexes.sql           the plan's indexes
--   0004_constraints.sql       the plan's named constraints (phase 3)
--   0005_replica_identity.sql  REPLICA IDENTITY FULL where the rules in rules/ need old values
--
-- Rules:
--   - No CREATE INDEX CONCURRENTLY: a file may run inside one transaction
--     (`psql --single-transaction`, or a test harness that wraps it).
--   - No BEGIN/COMMIT inside a file: the runner decides the transaction.
--   - Every statement is guarded (IF NOT EXISTS, or a DO block that checks the catalog), so
--     re-applying the whole set to a database that already has it changes nothing. The
--     docker-compose `migrate` service relies on that: it runs every file on each `up`.
--   - Nothing here creates a publication or a slot: `invalidator setup` / `run` do.

DO $$
BEGIN
    -- The life cycle of a booking, as customers and admins see it.
    CREATE TYPE booking_overall_status_enum AS ENUM (
        'pending',       -- created, waiting for payment authorization and contract
        'confirmed',     -- paid (authorized) and signed; the car is held
        'in_progress',   -- the car has been picked up
        'completed',     -- the car is back and the booking is settled
        'cancelled'
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$
BEGIN
    -- Payment state of a booking (PayPal: authorize at booking, capture at pickup).
    CREATE TYPE payment_status_enum AS ENUM (
        'pending',
        'authorized',
        'captured',
        'partially_refunded',
        'refunded',
        'voided',
        'failed'
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$
BEGIN
    -- State of the rental contract sent for e-signature.
    CREATE TYPE contract_status_enum AS ENUM (
        'not_sent',
        'sent',
        'viewed',
        'signed',
        'declined',
        'voided'
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$
BEGIN
    -- Who made a change: bookings.updated_by_type, booking_events.actor_type.
    CREATE TYPE actor_type_enum AS ENUM (
        'customer',
        'admin',
        'system',
        'webhook'
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$
BEGIN
    -- One car on one day: car_availability.status.
    CREATE TYPE availability_status_enum AS ENUM (
        'available',
        'booked',
        'maintenance',
        'blocked'
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$
BEGIN
    -- The kinds of entries on a booking's timeline: booking_events.event_type.
    CREATE TYPE booking_event_type_enum AS ENUM (
        'booking_created',
        'status_changed',
        'dates_changed',
        'car_changed',
        'payment_authorized',
        'payment_received',
        'payment_refunded',
        'payment_failed',
        'invoice_sent',
        'contract_sent',
        'contract_signed',
        'car_picked_up',
        'car_returned',
        'email_sent',
        'note_added',
        'cancelled'
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

DO $$
BEGIN
    -- PayPal invoice states (a subset of PayPal's Invoicing API statuses, lower-cased).
    CREATE TYPE invoice_status_enum AS ENUM (
        'draft',
        'sent',
        'scheduled',
        'payment_pending',
        'partially_paid',
        'paid',
        'marked_as_paid',
        'partially_refunded',
        'refunded',
        'marked_as_refunded',
        'cancelled'
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
