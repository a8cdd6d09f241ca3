-- Tables, in dependency order, with their primary keys and the foreign keys of the plan's ER
-- diagram (inbox_emails.booking_id gets its named foreign key in 0004_constraints.sql).
--
-- Conventions: uuid primary keys defaulting to gen_random_uuid(); money as numeric(10,2);
-- instants as timestamptz; created_at/updated_at on every mutable table (the application sets
-- updated_at; there are no triggers, so the WAL holds exactly the writes the application made).

-- A person who rents. Guests who check out without an account have no user_id.
CREATE TABLE IF NOT EXISTS customers (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The authentication user (auth.users.id on Supabase); a plain uuid here, NULL for guests.
    user_id     uuid        UNIQUE,
    email       text        NOT NULL UNIQUE,
    phone       text,
    name        text        NOT NULL,
    preferences jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- Soft delete (plan 3.2).
    deleted_at  timestamptz
);

-- The fleet (hundreds of rows, rarely written).
CREATE TABLE IF NOT EXISTS cars (
    id             uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    make           text          NOT NULL,
    model          text          NOT NULL,
    year           integer       NOT NULL CHECK (year BETWEEN 1950 AND 2100),
    daily_rate     numeric(10,2) NOT NULL CHECK (daily_rate >= 0),
    is_available   boolean       NOT NULL DEFAULT true,
    -- Denormalized from approved car_reviews by the application.
    average_rating numeric(3,2)  NOT NULL DEFAULT 0 CHECK (average_rating BETWEEN 0 AND 5),
    review_count   integer       NOT NULL DEFAULT 0 CHECK (review_count >= 0),
    -- Feature details for the car page ([{"name": "GPS", ...}]), and their names as an array
    -- for the GIN-indexed search filter (plan: "ALTER TABLE cars ADD COLUMN features_array").
    features       jsonb         NOT NULL DEFAULT '[]'::jsonb,
    features_array text[]        NOT NULL DEFAULT '{}',
    -- The pickup location's code (e.g. 'miami-downtown'); the plan keeps locations as text ids.
    location_id    text          NOT NULL,
    image_url      text,
    description    text,
    created_at     timestamptz   NOT NULL DEFAULT now(),
    updated_at     timestamptz   NOT NULL DEFAULT now()
);

-- One feature of one car; the search filter joins on name.
CREATE TABLE IF NOT EXISTS car_features (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    car_id      uuid        NOT NULL REFERENCES cars (id) ON DELETE CASCADE,
    name        text        NOT NULL,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (car_id, name)
);

-- A rental. Hard deletes are rare (soft delete via deleted_at); cars and customers with
-- bookings cannot be deleted.
CREATE TABLE IF NOT EXISTS bookings (
    id                   uuid                        PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id          uuid                        NOT NULL REFERENCES customers (id) ON DELETE RESTRICT,
    car_id               uuid                        NOT NULL REFERENCES cars (id) ON DELETE RESTRICT,
    start_date           timestamptz                 NOT NULL,
    end_date             timestamptz                 NOT NULL,
    total_amount         numeric(10,2)               NOT NULL,
    currency             text                        NOT NULL DEFAULT 'USD',
    overall_status       booking_overall_status_enum NOT NULL DEFAULT 'pending',
    payment_status       payment_status_enum         NOT NULL DEFAULT 'pending',
    contract_status      contract_status_enum        NOT NULL DEFAULT 'not_sent',
    contract_document_id text,
    contract_signed_at   timestamptz,
    notes                text,
    created_at           timestamptz                 NOT NULL DEFAULT now(),
    updated_at           timestamptz                 NOT NULL DEFAULT now(),
    -- Audit fields (plan 3.2): soft delete, optimistic locking, who changed it last.
    deleted_at           timestamptz,
    deleted_by           uuid,
    version              integer                     NOT NULL DEFAULT 1,
    updated_by           uuid,
    updated_by_type      actor_type_enum
);

-- The availability calendar: one row per car per day that is not simply "free" by default
-- (about 365 rows per car). The plan's phase 4 partitions it by month; not done here.
CREATE TABLE IF NOT EXISTS car_availability (
    id             uuid                     PRIMARY KEY DEFAULT gen_random_uuid(),
    car_id         uuid                     NOT NULL REFERENCES cars (id) ON DELETE CASCADE,
    date           date                     NOT NULL,
    status         availability_status_enum NOT NULL DEFAULT 'available',
    -- The booking that holds the day, when status = 'booked'.
    booking_id     uuid                     REFERENCES bookings (id) ON DELETE SET NULL,
    -- A day-specific rate (weekends, holidays); NULL means cars.daily_rate.
    price_override numeric(10,2)            CHECK (price_override >= 0),
    notes          text,
    created_at     timestamptz              NOT NULL DEFAULT now(),
    updated_at     timestamptz              NOT NULL DEFAULT now()
);

-- A booking's timeline (audit log): append-only, 10-20 rows per booking.
CREATE TABLE IF NOT EXISTS booking_events (
    id           uuid                    PRIMARY KEY DEFAULT gen_random_uuid(),
    booking_id   uuid                    NOT NULL REFERENCES bookings (id) ON DELETE CASCADE,
    event_type   booking_event_type_enum NOT NULL,
    "timestamp"  timestamptz             NOT NULL DEFAULT now(),
    actor_type   actor_type_enum         NOT NULL DEFAULT 'system',
    -- customers.id for a customer, the admin's user id for an admin, NULL for system/webhook.
    actor_id     uuid,
    summary_text text,
    details      jsonb                   NOT NULL DEFAULT '{}'::jsonb
);

-- A customer's review of a car; shown publicly once approved.
CREATE TABLE IF NOT EXISTS car_reviews (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    car_id      uuid        NOT NULL REFERENCES cars (id) ON DELETE CASCADE,
    customer_id uuid        REFERENCES customers (id) ON DELETE SET NULL,
    -- The rental being reviewed: at most one review per booking.
    booking_id  uuid        UNIQUE REFERENCES bookings (id) ON DELETE SET NULL,
    rating      smallint    NOT NULL CHECK (rating BETWEEN 1 AND 5),
    title       text,
    comment     text,
    is_approved boolean     NOT NULL DEFAULT false,
    is_verified boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Invoices issued through PayPal's Invoicing API. Financial records: a booking with invoices
-- cannot be hard-deleted.
CREATE TABLE IF NOT EXISTS paypal_invoices (
    id                uuid                PRIMARY KEY DEFAULT gen_random_uuid(),
    booking_id        uuid                NOT NULL REFERENCES bookings (id) ON DELETE RESTRICT,
    paypal_invoice_id text                NOT NULL UNIQUE,
    invoice_number    text,
    status            invoice_status_enum NOT NULL DEFAULT 'draft',
    amount            numeric(10,2)       NOT NULL CHECK (amount >= 0),
    tax_amount        numeric(10,2)       NOT NULL DEFAULT 0 CHECK (tax_amount >= 0),
    discount_amount   numeric(10,2)       NOT NULL DEFAULT 0 CHECK (discount_amount >= 0),
    currency          text                NOT NULL DEFAULT 'USD',
    due_date          date,
    paid_at           timestamptz,
    invoice_url       text,
    -- The admin who issued it.
    created_by        uuid,
    created_at        timestamptz         NOT NULL DEFAULT now(),
    updated_at        timestamptz         NOT NULL DEFAULT now()
);

-- The secret link that lets a customer open their booking without logging in (one per
-- booking; rotating it replaces token_hash). Only a hash of the token is stored, so neither the
-- database nor cache key names ever hold a usable credential.
CREATE TABLE IF NOT EXISTS booking_secure_tokens (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    booking_id   uuid        NOT NULL UNIQUE REFERENCES bookings (id) ON DELETE CASCADE,
    -- Lower-case hex SHA-256 of the token in the link.
    token_hash   text        NOT NULL UNIQUE,
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Outgoing email log, kept current by Resend webhooks (sent, delivered, opened, bounced...).
-- Bodies stay at Resend; rows are small. booking_id's foreign key (ON DELETE SET NULL) is
-- fk_inbox_emails_booking in 0004_constraints.sql.
CREATE TABLE IF NOT EXISTS inbox_emails (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    resend_email_id text        NOT NULL UNIQUE,
    booking_id      uuid,
    sender_email    text        NOT NULL,
    recipient_email text        NOT NULL,
    subject         text,
    -- The latest Resend event type, e.g. 'email.delivered'.
    last_event_type text        NOT NULL DEFAULT 'email.sent',
    last_event_at   timestamptz,
    tags            jsonb       NOT NULL DEFAULT '[]'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
