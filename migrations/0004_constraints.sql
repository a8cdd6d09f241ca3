-- The plan's named integrity constraints (phase 3.1). ALTER TABLE ... ADD CONSTRAINT has no
-- IF NOT EXISTS, so each one is added only when the catalog does not have it yet.

DO $$
BEGIN
    -- One calendar row per car per day.
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'uk_car_availability_date'
                     AND conrelid = 'car_availability'::regclass) THEN
        ALTER TABLE car_availability
            ADD CONSTRAINT uk_car_availability_date UNIQUE (car_id, date);
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'chk_booking_dates'
                     AND conrelid = 'bookings'::regclass) THEN
        ALTER TABLE bookings
            ADD CONSTRAINT chk_booking_dates CHECK (start_date < end_date);
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'chk_booking_amount'
                     AND conrelid = 'bookings'::regclass) THEN
        ALTER TABLE bookings
            ADD CONSTRAINT chk_booking_amount CHECK (total_amount >= 0);
    END IF;

    -- Emails outlive their booking: deleting a booking detaches them.
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'fk_inbox_emails_booking'
                     AND conrelid = 'inbox_emails'::regclass) THEN
        ALTER TABLE inbox_emails
            ADD CONSTRAINT fk_inbox_emails_booking
            FOREIGN KEY (booking_id) REFERENCES bookings (id) ON DELETE SET NULL;
    END IF;
END $$;
