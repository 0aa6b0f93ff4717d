//! The built-in dataset: synthetic patient questions assembled from templates (who is asking, symptoms,
//! durations, medications, test results, question forms), 40-200 words each, and one fixed system prompt
//! per doctor adapter that starts with a clinic preamble shared by every doctor, as in production, so
//! prefix caching sees realistic sharing.

use rand::seq::IndexedRandom;
use rand::Rng;
use xxhash_rust::xxh3::xxh3_64;

/// Inclusive word-count bounds of a generated question.
pub const MIN_WORDS: usize = 40;
pub const MAX_WORDS: usize = 200;

const WHO: &[&str] = &[
    "woman",
    "man",
    "mother of two",
    "retired teacher",
    "student",
    "nurse",
    "office worker",
    "construction worker",
    "runner",
    "grandfather",
    "grandmother",
    "new father",
];
const RELATIVES: &[&str] = &[
    "son", "daughter", "husband", "wife", "father", "mother", "partner",
];
const SYMPTOMS: &[&str] = &[
    "a dull headache behind my eyes",
    "a dry cough that will not go away",
    "sharp pain in my lower back",
    "a rash on my forearms that itches at night",
    "heartburn after almost every meal",
    "shortness of breath when climbing stairs",
    "swelling in both ankles",
    "pain in my right knee when I bend it",
    "ringing in my left ear",
    "tingling and numbness in my fingers",
    "a sore throat and a low fever",
    "dizziness when I stand up quickly",
    "trouble falling asleep and waking up at 4 am",
    "stomach cramps and loose stools",
    "a lump under my arm that feels tender",
    "blurry vision in the evenings",
    "palpitations that come and go",
    "frequent urination, even at night",
    "tightness in my chest after exercise",
    "joint stiffness in the mornings",
];
const DURATIONS: &[&str] = &[
    "two days",
    "four days",
    "a week",
    "ten days",
    "two weeks",
    "three weeks",
    "a month",
    "six weeks",
    "two months",
    "three months",
    "half a year",
    "almost a year",
];
const TRIGGERS: &[&str] = &[
    "in the morning",
    "at night",
    "after I eat",
    "when I lie down",
    "when I exercise",
    "when the weather turns cold",
    "after long days at work",
    "when I am stressed",
];
const MEDICATIONS: &[(&str, &str, &str)] = &[
    ("metformin", "500 mg twice a day", "type 2 diabetes"),
    ("lisinopril", "10 mg once a day", "high blood pressure"),
    ("atorvastatin", "20 mg at night", "high cholesterol"),
    (
        "levothyroxine",
        "75 micrograms every morning",
        "an underactive thyroid",
    ),
    ("omeprazole", "20 mg before breakfast", "acid reflux"),
    ("sertraline", "50 mg a day", "anxiety"),
    ("ibuprofen", "400 mg when needed", "joint pain"),
    ("amlodipine", "5 mg a day", "blood pressure"),
    ("salbutamol", "two puffs when needed", "asthma"),
    ("warfarin", "3 mg a day", "atrial fibrillation"),
];
const TEST_RESULTS: &[&str] = &[
    "an HbA1c of 7.2 percent",
    "a TSH of 6.8",
    "LDL cholesterol of 4.1 mmol/L",
    "a vitamin D level of 18 ng/mL",
    "ferritin of 9, which the lab flagged as low",
    "a CRP of 24",
    "an eGFR of 58",
    "slightly raised liver enzymes, ALT 62",
    "a white cell count of 11.5",
    "blood pressure readings around 150 over 95",
    "a resting heart rate of 104",
    "fasting glucose of 6.4",
];
const CONDITIONS: &[&str] = &[
    "asthma",
    "migraines",
    "high blood pressure",
    "eczema",
    "kidney stones",
    "depression",
    "type 2 diabetes",
    "a thyroid problem",
    "irritable bowel syndrome",
    "gout",
];
const REMEDIES: &[&str] = &[
    "paracetamol",
    "ibuprofen",
    "antihistamines",
    "a heat pad",
    "resting for a few days",
    "drinking more water",
    "cutting out coffee",
    "an over-the-counter cream",
];
const ACTIVITIES: &[&str] = &[
    "sleep through the night",
    "concentrate at work",
    "look after my kids",
    "go for my usual runs",
    "drive long distances",
    "climb the stairs at home",
    "enjoy meals with my family",
];
const SERIOUS: &[&str] = &[
    "a heart attack in his fifties",
    "colon cancer",
    "a stroke",
    "lupus",
    "multiple sclerosis",
    "kidney failure",
    "breast cancer",
];
const QUESTIONS: &[&str] = &[
    "Should I be worried about this?",
    "What could be causing this, and do I need to see someone in person?",
    "Is this something that can wait until my next appointment, or should I come in sooner?",
    "Could this be a side effect of my medication?",
    "What tests would you recommend to find out what is going on?",
    "Is there anything I can do at home to make it better in the meantime?",
    "Do you think I need to change my medication or my dose?",
    "How long should I wait before going to the emergency department?",
    "Could these results explain how I have been feeling?",
    "What are the warning signs that would mean this is serious?",
];

/// One synthetic patient question of 40-200 words.
pub fn patient_question(rng: &mut impl Rng) -> String {
    let target = rng.random_range(MIN_WORDS..=MAX_WORDS);
    let mut parts = vec![intro(rng), complaint(rng)];
    let question = pick(rng, QUESTIONS).to_string();
    let mut words = count_words(&parts) + question.split_whitespace().count();
    while words < target {
        let d = detail(rng);
        let n = d.split_whitespace().count();
        if words + n > MAX_WORDS {
            break;
        }
        words += n;
        parts.push(d);
    }
    parts.push(question);
    parts.join(" ")
}

fn count_words(parts: &[String]) -> usize {
    parts.iter().map(|p| p.split_whitespace().count()).sum()
}

fn pick<'a, T>(rng: &mut impl Rng, xs: &'a [T]) -> &'a T {
    // Every pool above is a non-empty constant.
    xs.choose(rng).unwrap_or(&xs[0])
}

fn intro(rng: &mut impl Rng) -> String {
    let age = rng.random_range(18..=90);
    if rng.random_bool(0.25) {
        let rel = pick(rng, RELATIVES);
        format!("I am writing about my {rel}, who is {age} years old.")
    } else {
        format!("Hello doctor, I am a {age}-year-old {}.", pick(rng, WHO))
    }
}

fn complaint(rng: &mut impl Rng) -> String {
    let (s, d) = (pick(rng, SYMPTOMS), pick(rng, DURATIONS));
    match rng.random_range(0..3) {
        0 => format!("For the past {d} I have had {s}."),
        1 => format!("About {d} ago I started getting {s}, and it has not really improved."),
        _ => format!("I have been dealing with {s} for {d} now."),
    }
}

fn detail(rng: &mut impl Rng) -> String {
    match rng.random_range(0..9) {
        0 => format!(
            "I have also noticed {}, which seems worse {}.",
            pick(rng, SYMPTOMS),
            pick(rng, TRIGGERS)
        ),
        1 => {
            let (med, dose, cond) = pick(rng, MEDICATIONS);
            format!("I take {med} {dose} for {cond}, and I have not missed any doses.")
        }
        2 => format!(
            "My last blood test, about {} ago, showed {}.",
            pick(rng, DURATIONS),
            pick(rng, TEST_RESULTS)
        ),
        3 => format!(
            "I have a history of {} and my doctor once mentioned {} as a concern.",
            pick(rng, CONDITIONS),
            pick(rng, CONDITIONS)
        ),
        4 => format!(
            "On a scale of one to ten it is about a {} most days.",
            rng.random_range(2..=9)
        ),
        5 => format!(
            "I tried {} but it only helped for a few hours.",
            pick(rng, REMEDIES)
        ),
        6 => format!(
            "I am a bit anxious because my {} had {}.",
            pick(rng, RELATIVES),
            pick(rng, SERIOUS)
        ),
        7 => format!(
            "It is making it hard to {}, and I am getting frustrated.",
            pick(rng, ACTIVITIES)
        ),
        _ => format!(
            "I do not smoke, I drink maybe {} glasses of wine a week, and I walk most days.",
            rng.random_range(0..=10)
        ),
    }
}

const PREAMBLE: &str = "You are a physician answering patient messages for the Caduceus telehealth \
clinic. Patients write in plain language and may be worried. Answer in a warm, clear and professional \
tone, in short paragraphs. Explain what the symptoms could mean, from the most likely to the less likely \
causes, without claiming a diagnosis you cannot make from a message. Always say which warning signs need \
emergency care (chest pain, trouble breathing, sudden weakness, confusion, heavy bleeding) and tell the \
patient to call emergency services if any of them appear. Recommend an in-person visit when an \
examination or tests are needed, and say how soon. Do not change prescription doses yourself; suggest \
discussing changes with the prescribing doctor. Keep the answer under 250 words.";

const FIRST_NAMES: &[&str] = &[
    "Amelia", "Rahul", "Sofia", "Kwame", "Elena", "Hiroshi", "Fatima", "Lucas", "Ingrid", "Mateo",
    "Aisha", "Jonas", "Priya", "Tomasz", "Grace", "Omar",
];
const LAST_NAMES: &[&str] = &[
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Haddad",
    "Novak",
    "Silva",
    "Brennan",
    "Kowalski",
    "Mensah",
    "Rossi",
    "Chen",
    "Petrov",
    "Nakamura",
    "Alvarez",
    "Fischer",
];
const SPECIALTIES: &[&str] = &[
    "family medicine",
    "internal medicine",
    "cardiology",
    "endocrinology",
    "dermatology",
    "gastroenterology",
    "pulmonology",
    "neurology",
    "rheumatology",
    "geriatrics",
];
const STYLES: &[&str] = &[
    "You like to start by acknowledging how the patient feels.",
    "You prefer numbered next steps at the end of each answer.",
    "You often use simple analogies to explain how the body works.",
    "You are brief and direct, and you avoid medical jargon.",
    "You like to ask one clarifying question when details are missing.",
    "You always mention lifestyle changes that could help.",
];

/// The fixed system prompt of a doctor adapter: the shared clinic preamble, then a persona derived
/// deterministically from the adapter id (so it is the same in every run, whatever the adapter order).
pub fn doctor_system_prompt(adapter_id: &str) -> String {
    let h = xxh3_64(adapter_id.as_bytes()) as usize;
    let first = FIRST_NAMES[h % FIRST_NAMES.len()];
    let last = LAST_NAMES[(h >> 8) % LAST_NAMES.len()];
    let specialty = SPECIALTIES[(h >> 16) % SPECIALTIES.len()];
    let style = STYLES[(h >> 24) % STYLES.len()];
    format!(
        "{PREAMBLE}\n\nYou are Dr. {first} {last}, a specialist in {specialty}. Sign your answers as \
         Dr. {last}. {style}"
    )
}

/// The system prompt used when requests go to the base model rather than to a doctor adapter.
pub fn base_system_prompt() -> String {
    PREAMBLE.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn questions_are_40_to_200_words_and_varied() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let qs: Vec<String> = (0..2000).map(|_| patient_question(&mut rng)).collect();
        let lens: Vec<usize> = qs.iter().map(|q| q.split_whitespace().count()).collect();
        assert!(
            lens.iter().all(|&n| (MIN_WORDS..=MAX_WORDS).contains(&n)),
            "{lens:?}"
        );
        assert!(*lens.iter().min().unwrap() < 60 && *lens.iter().max().unwrap() > 180);
        let distinct: std::collections::HashSet<&String> = qs.iter().collect();
        assert_eq!(distinct.len(), qs.len());
        assert!(qs.iter().all(|q| q.ends_with('?')));
    }

    #[test]
    fn doctor_prompts_share_the_preamble_and_are_stable() {
        let a = doctor_system_prompt("doctor-0001");
        let b = doctor_system_prompt("doctor-0002");
        assert!(a.starts_with(PREAMBLE) && b.starts_with(PREAMBLE));
        assert_eq!(a, doctor_system_prompt("doctor-0001"));
        let personas: std::collections::HashSet<String> = (0..50)
            .map(|i| doctor_system_prompt(&format!("doctor-{i:04}")))
            .collect();
        assert!(personas.len() > 40);
    }
}
